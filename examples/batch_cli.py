"""A batch command-line tool: every matching file under a directory, gzip-compressed into
another directory tree, with a manifest of checksums and counts, by two pools in one process.

A light pool of I/O workers reads and writes the files: several of them, because they
spend their time waiting on the disk. A heavy pool, one worker per CPU by default,
compresses each file's content and measures it (SHA-256, lines, words). The three stages
are chained map() calls, so the files stream through both pools at once, each stage with a
bounded number in flight:

    read (I/O pool) -> compress and measure (CPU pool) -> write (I/O pool)

For each input file INPUT_DIR/a/b.txt the tool writes OUTPUT_DIR/a/b.txt.gz (gzip, no
timestamp in the header, so the output is the same from run to run) and a line of
OUTPUT_DIR/manifest.tsv. A file that cannot be read or written is reported and the others
carry on; the exit status is then 1.

    python examples/batch_cli.py INPUT_DIR OUTPUT_DIR [--workers auto|N] [--io-workers N]
                                 [--pattern '*.txt'] [--level 1-9] [--no-progress]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import mpop

MANIFEST = "manifest.tsv"
MANIFEST_HEADER = "path\tbytes\tlines\twords\tsha256\tgzip_bytes\n"
# File contents in flight in one stage, at most (but at least one file a worker): what
# sizes each pool's shared argument pool.
IN_FLIGHT_BYTES = 16 << 20


# -- the handlers: they run in the workers ---------------------------------------------------


def read_file(path: str) -> tuple[bytes, str]:
    """I/O pool: (the file's bytes, "") or (b"", what went wrong)."""
    try:
        with open(path, "rb") as f:
            return f.read(), ""
    except OSError as e:
        return b"", f"{type(e).__name__}: {e.strerror or e}"


def compress_and_measure(item: tuple[bytes, str], level: int) -> tuple[bytes, str, int, int, int, str]:
    """CPU pool: (gzip of the content, its SHA-256, bytes, lines, words, error) for one
    file's (content, error) from read_file."""
    data, error = item
    if error:
        return b"", "", 0, 0, 0, error
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return (gzip.compress(data, compresslevel=level, mtime=0), hashlib.sha256(data).hexdigest(),
            len(data), lines, len(data.split()), "")


def write_output(path: str, item: tuple[bytes, str, int, int, int, str]) -> tuple[str, int, int, int, int, str]:
    """I/O pool: writes the compressed content to `path` (through a temporary name, so a
    reader never sees half a file) and returns the measures (sha256, bytes, lines, words,
    gzip bytes, error) without the content."""
    packed, sha, size, lines, words, error = item
    if error:
        return sha, size, lines, words, 0, error
    tmp = f"{path}.part"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(packed)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        return sha, size, lines, words, 0, f"{type(e).__name__}: {e.strerror or e}"
    return sha, size, lines, words, len(packed), ""


# -- the owner ------------------------------------------------------------------------------


class Counted:
    """An iterator with a length known in advance, so that map()'s progress bar shows a
    total (map() counts an input as sized when len() works on it)."""

    def __init__(self, it: Iterable, n: int) -> None:
        self.it, self.n = iter(it), n

    def __iter__(self) -> Iterator:
        return self.it

    def __len__(self) -> int:
        return self.n


def workers_arg(text: str) -> int:
    """--workers: "auto" (the CPUs this process may use) or an int >= 1."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 1, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return n


def level_arg(text: str) -> int:
    if text not in {str(i) for i in range(1, 10)}:
        raise argparse.ArgumentTypeError(f"must be an int from 1 to 9, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="batch_cli.py",
        description="Gzip every matching file under INPUT_DIR into OUTPUT_DIR (same tree, .gz "
                    "added), with a manifest of checksums and counts: an I/O pool reads and "
                    "writes, a CPU pool compresses and measures.")
    p.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    p.add_argument("--workers", type=workers_arg, default="auto", metavar="auto|N",
                   help="CPU pool workers (default: auto, the CPUs this process may use)")
    p.add_argument("--io-workers", type=positive_int, default=4, metavar="N",
                   help="I/O pool workers (default: 4)")
    p.add_argument("--pattern", default="*", help="file name pattern, matched in every "
                   "subdirectory (default: '*', every file)")
    p.add_argument("--level", type=level_arg, default=9, metavar="1-9", help="gzip level (default: 9)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.input_dir.is_dir():
        what = "is not a directory" if args.input_dir.exists() else "does not exist"
        p.error(f"input directory {str(args.input_dir)!r} {what}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        p.error(f"output {str(args.output_dir)!r} exists and is not a directory")
    return args


def find_inputs(root: Path, pattern: str, skip: Path) -> list[Path]:
    """Files under `root` whose name matches `pattern`, sorted, none under `skip` (the
    output directory, which may lie inside the input)."""
    skip = skip.resolve()
    out = []
    for p in sorted(root.rglob(pattern)):
        if p.is_file() and skip not in p.resolve().parents:
            out.append(p)
    return out


def pool_options(workers: int, largest: int) -> dict:
    """max_in_flight for a stage and pool_bytes for its app: contents in flight stay within
    IN_FLIGHT_BYTES (at least one file a worker), and the pool holds twice that (a stage's
    arguments and results) with room to spare."""
    in_flight = max(workers, min(4096, IN_FLIGHT_BYTES // max(largest, 1)))
    need = 8 * in_flight * max(largest, 1)
    return {"max_in_flight": in_flight, "pool_bytes": max(64 << 20, -(-need // (1 << 20)) << 20)}


def busy_seconds(app: mpop.MpopApi) -> float:
    return sum(w["busy_s"] for w in app.status()["workers"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_root = args.output_dir
    inputs = find_inputs(args.input_dir, args.pattern, out_root)
    if not inputs:
        print(f"batch_cli.py: error: no file under {str(args.input_dir)!r} matches {args.pattern!r}",
              file=sys.stderr)
        return 1
    sizes = [p.stat().st_size for p in inputs]
    rel = [p.relative_to(args.input_dir) for p in inputs]
    outputs = [str(out_root / f"{r}.gz") for r in rel]
    io_opts = pool_options(args.io_workers, max(sizes))
    cpu_opts = pool_options(args.workers, max(sizes))

    t0 = time.perf_counter()
    with mpop.MpopApi(workers=args.io_workers, pool_bytes=io_opts["pool_bytes"]) as io, \
         mpop.MpopApi(workers=args.workers, pool_bytes=cpu_opts["pool_bytes"]) as cpu:
        read = io.map(read_file, [str(p) for p in inputs], max_in_flight=io_opts["max_in_flight"])
        packed = cpu.map(functools.partial(compress_and_measure, level=args.level), read,
                         max_in_flight=cpu_opts["max_in_flight"])
        written = io.map(write_output, outputs, Counted(packed, len(inputs)), progress=not args.no_progress,
                         max_in_flight=io_opts["max_in_flight"])
        rows = list(written)
        elapsed = time.perf_counter() - t0
        io_busy, cpu_busy = busy_seconds(io), busy_seconds(cpu)

    failed = [(r, error) for r, (*_, error) in zip(rel, rows) if error]
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / MANIFEST, "w") as f:
        f.write(MANIFEST_HEADER)
        for r, (sha, size, lines, words, gz_size, error) in zip(rel, rows):
            if not error:
                f.write(f"{r}\t{size}\t{lines}\t{words}\t{sha}\t{gz_size}\n")

    done = len(rows) - len(failed)
    mb_in = sum(row[1] for row in rows if not row[5]) / 1e6
    mb_out = sum(row[4] for row in rows if not row[5]) / 1e6
    print(f"{done} files, {mb_in:.2f} MB -> {mb_out:.2f} MB (gzip -{args.level}) in {elapsed:.2f} s, "
          f"worker start-up included: {done / elapsed:.1f} files/s, {mb_in / elapsed:.2f} MB/s")
    for name, n, busy, what in (("io ", args.io_workers, io_busy, "read + write"),
                                ("cpu", args.workers, cpu_busy, "compress + sha256 + counts")):
        print(f"  {name} pool: {n} workers, busy {busy:.2f} s in all ({what}), "
              f"{100 * busy / (n * elapsed):.0f}% of their time")
    print(f"  manifest: {out_root / MANIFEST}")
    for r, error in failed:
        print(f"batch_cli.py: failed: {r}: {error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(rows)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
