"""examples/batch_cli.py: a command-line batch tool with two pools in one process (an I/O
pool reads and writes, a CPU pool compresses and measures), run end to end as a user runs
it: every output and manifest line checked, the summary, and its errors."""

from __future__ import annotations

import gzip
import os
import hashlib
import random
import re
from pathlib import Path

import pytest

from _helpers import EXAMPLES, leak_check, run_python

SCRIPT = str(EXAMPLES / "batch_cli.py")
WORDS = ["ring", "slot", "worker", "pool", "claim", "result", "supervisor", "é"]


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """300 text files in 5 subdirectories (an empty one and one without a final newline
    among them), plus files the pattern must skip."""
    rng = random.Random(20)
    root = tmp_path / "in"
    files = {}
    for i in range(300):
        n = 0 if i == 7 else rng.randint(1, 150)
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n))
        if i % 3:
            text += "\n" if n else ""
        files[f"d{i % 5}/f{i:04d}.txt"] = text.encode()
    files["d1/big.txt"] = b"".join(b"line %d of a larger file\n" % i for i in range(200_000))  # ~5 MB
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "d0" / "notes.md").write_text("not a .txt\n")
    (root / "d2" / "dir.txt").mkdir()  # matches the pattern, but is no file
    return root, files


def run_cli(*args: str):
    return run_python([SCRIPT, *args])


def manifest(out: Path) -> dict[str, list[str]]:
    lines = (out / "manifest.tsv").read_text().splitlines()
    assert lines[0] == "path\tbytes\tlines\twords\tsha256\tgzip_bytes"
    return {row.split("\t")[0]: row.split("\t")[1:] for row in lines[1:]}


def test_every_file_is_compressed_and_measured_with_a_progress_bar_and_a_summary(tree, tmp_path):
    root, files = tree
    out = tmp_path / "out"
    proc = run_cli(str(root), str(out), "--pattern", "*.txt", "--workers", "2", "--io-workers", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert produced == sorted([f"{rel}.gz" for rel in files] + ["manifest.tsv"])
    rows = manifest(out)
    assert sorted(rows) == sorted(files)
    for rel, data in files.items():
        assert gzip.decompress((out / f"{rel}.gz").read_bytes()) == data, rel
        size, lines, words, sha, gz_size = rows[rel]
        assert int(size) == len(data) and sha == hashlib.sha256(data).hexdigest(), rel
        assert int(lines) == len(data.decode().splitlines()), rel
        assert int(words) == len(data.split()), rel
        assert int(gz_size) == (out / f"{rel}.gz").stat().st_size, rel
    mb = sum(len(d) for d in files.values()) / 1e6
    m = re.search(r"^301 files, ([\d.]+) MB -> [\d.]+ MB \(gzip -9\) in [\d.]+ s, worker start-up included: "
                  r"[\d.]+ files/s, [\d.]+ MB/s$", proc.stdout, re.M)
    assert m and float(m[1]) == pytest.approx(mb, abs=0.01), proc.stdout
    assert re.search(r"^  io  pool: 3 workers, busy [\d.]+ s in all \(read \+ write\)", proc.stdout, re.M)
    assert re.search(r"^  cpu pool: 2 workers, busy [\d.]+ s in all \(compress", proc.stdout, re.M)
    assert "301/301" in proc.stderr  # the progress bar, with its total


def test_the_defaults_take_every_file_with_workers_auto_and_no_bar(tree, tmp_path):
    root, files = tree
    out = root / "out"  # inside the input: its files are not inputs
    proc = run_cli(str(root), str(out), "--no-progress", "--level", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(manifest(out)) == sorted([*files, "d0/notes.md"])
    assert re.search(r"^302 files, .* \(gzip -1\)", proc.stdout, re.M), proc.stdout
    # auto: the CPUs this process may use (the script inherits the affinity)
    assert f"cpu pool: {len(os.sched_getaffinity(0))} workers" in proc.stdout
    assert proc.stderr == ""


def test_a_file_that_cannot_be_written_fails_alone(tree, tmp_path):
    root, files = tree
    out = tmp_path / "out"
    (out / "d3" / "f0003.txt.gz").mkdir(parents=True)  # where an output must go
    proc = run_cli(str(root), str(out), "--pattern", "*.txt", "--no-progress")
    assert proc.returncode == 1
    assert "batch_cli.py: failed: d3/f0003.txt: IsADirectoryError" in proc.stderr
    assert "1 of 301 files failed" in proc.stderr
    assert proc.stdout.startswith("300 files, ")
    rows = manifest(out)
    assert "d3/f0003.txt" not in rows and len(rows) == 300
    assert not list(out.rglob("*.part"))
    assert gzip.decompress((out / "d3" / "f0008.txt.gz").read_bytes()) == files["d3/f0008.txt"]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "argument --workers: must be 'auto' or an int >= 1, got '0'"),
    (["--workers", "many"], "argument --workers: must be 'auto' or an int >= 1, got 'many'"),
    (["--io-workers", "-2"], "argument --io-workers: must be an int >= 1, got '-2'"),
    (["--level", "10"], "argument --level: must be an int from 1 to 9, got '10'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_argument_is_a_usage_error(tree, tmp_path, args, message):
    root, _ = tree
    proc = run_cli(str(root), str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: batch_cli.py")
    assert f"batch_cli.py: error: {message}" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_a_missing_input_directory_or_no_matching_file_is_a_clear_error(tree, tmp_path):
    root, _ = tree
    proc = run_cli(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"batch_cli.py: error: input directory '{tmp_path / 'nowhere'}' does not exist" in proc.stderr

    proc = run_cli(str(root / "d0" / "notes.md"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr

    proc = run_cli(str(root), str(tmp_path / "out"), "--pattern", "*.csv")
    assert proc.returncode == 1
    assert proc.stderr == f"batch_cli.py: error: no file under '{root}' matches '*.csv'\n"
    assert not (tmp_path / "out").exists()
