"""The documentation's examples run, and print what the documentation shows.

Every ```python block of README.md and docs/guide.md is executed, and its output is compared
with the ```text block that follows it (the next fenced block after it, when that is a
```text block). Other fenced blocks (```sh, ```console, ```bash, a ```text block that does
not follow a ```python one) are not executed.

How blocks run:

- Each block is a complete script, run in a fresh interpreter (`_helpers.run_python`, so
  that it imports the mpop under test) whose working directory is a new temporary
  directory, with `PYTHONUNBUFFERED=1` and its standard error sent to its standard output,
  so that the output is interleaved as a terminal shows it, and with Python's own SIGINT
  handler (a shell starts background jobs with SIGINT ignored, which Python would keep:
  the Ctrl-C example needs it, as in a terminal). docs/guide.md says so: "Every example
  below is a complete script".
- A block marked `<!-- docs-test: continues -->` (README's second block, "continuing the
  same script") is appended to the script before it; the outputs shown under the parts
  are compared, in order, with the output of the whole.
- A block whose first line is `# file: NAME` is not run: it is written to NAME in the
  working directory of the script before it (a module that script imports).
- A block marked `<!-- docs-test: notebook -->` is split into cells at its blank lines and
  run as a notebook by a Jupyter kernel (nbclient), as the guide says it was. Its output is
  compared as a transcript: each output of cell N (counting from 1) under a line
  `--- cell N`; what follows `--- cell N` on such a line in the documentation is a comment.
- A block marked `<!-- docs-test: skip (reason) -->` is reported as a skipped test with that
  reason. None is marked today. Any other `docs-test` marker fails the test.

Every script must exit with status 0, and leave no process or shared-memory segment
behind. Lines are compared without trailing white space.

What is normalised: output that differs from run to run is compared after the
normalisations that a marker right before the ```text block names
(`<!-- docs-test: normalise NAME, NAME -->`). Each replaces the varying part, in the
documented and in the actual output alike, by a placeholder, and leaves the rest compared:

- `worker-table`: in the `mpop workers` table of the status views, the `pid`, `completed`,
  `busy_s` and `idle_s` columns and the task number and time in `running` (which worker
  ran which tasks, and for how long, depends on scheduling), and the column widths, which
  follow those values. A worker's state `idle` and `starting` compare equal: a worker that
  got no task may not have finished starting when the table is printed.
- `worker-states`: the `state` and `running` columns of that table, for a table printed
  as the work ends: a worker that has just published its last result may still be `busy`
  with it for a moment (it marks itself idle after publishing), and one that got no task
  may still be `starting`.
- `queue-timing`: the values of the queue-wait and run-time percentiles of the `mpop queue`
  table (timings).
- `result-timing`: `elapsed_s=`, `queue_wait_s=` and `run_time_s=` in a `RunResult` or
  `TaskResult` (timings), and `worker_id=` (which worker ran the task).
- `segment`: the 16 random hex digits of a segment name (`myjob_5ec4ec8bdbf2c89a`) and the
  pid in `owner pid N`.
- `timings`: every figure in seconds (`1.6 s`, `0.175s`).
- `worker-ids`: the worker id in the debug log's `on worker N` (which worker ran the task).
- `affinity-pids`: the worker pids in `(pid, (cpus,))` tuples.
- `interrupt-counts`: how many tasks had `finished:` and were `cancelled:` when Ctrl-C
  came (how far the workers got in one second).
- `cleanup-report`: the `kept ...` lines of `python -m mpop cleanup`, which reports every
  mpop segment on the machine: those lines are other programs' live segments.

A block that cannot run here, or a deliberate fragment, would be marked `skip`; a marker
is the only way not to run a block. The whole module takes well under a minute.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Callable

import pytest

import _helpers
from _helpers import PYDIR, REPO, leak_check, run_python

DOCS = ["README.md", "docs/guide.md"]

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
FILE_BLOCK = re.compile(r"^# file: (\S+)\s*$")

# A script's stderr joins its stdout at the file-descriptor level (so that its workers'
# and child processes' output joins too); Ctrl-C raises KeyboardInterrupt, as in a terminal
# (a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
# ignored); then the script runs as __main__ from its own file.
RUNNER = ("import os, runpy, signal\n"
          "os.dup2(1, 2)\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "runpy.run_path('example.py', run_name='__main__')\n")


# -- normalisations ----------------------------------------------------------------------


WORKER_COLUMNS = ["id", "pid", "state", "completed", "failed", "restarts", "busy_s", "idle_s", "running"]


def _worker_rows(change: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    """A normalisation that applies `change` to the cells of each row of the `mpop workers`
    tables in a text, and lays the tables out with two spaces between cells (the column
    widths follow the values) and `--` for the line under the header."""
    def run(text: str) -> str:
        out, in_table = [], False
        for line in text.splitlines():
            cells = re.split(r"\s{2,}", line.strip())
            if cells == WORKER_COLUMNS:
                in_table = True
            elif in_table and re.fullmatch(r"-+(\s+-+)*", line.strip()):
                cells = ["--"]
            elif in_table and len(cells) == len(WORKER_COLUMNS) and cells[0].isdigit():
                cells = change(cells)
            else:
                in_table = False
                out.append(line)
                continue
            out.append("  ".join(cells))
        return "\n".join(out)
    return run


def _vary_counts(cells: list[str]) -> list[str]:
    wid, _pid, state, _completed, failed, restarts, _busy, _idle, running = cells
    if state in ("idle", "starting"):
        state = "idle|starting"
    running = re.sub(r"^task \d+ \(.*\)$", "task <n> (<s>)", running)
    return [wid, "<pid>", state, "<n>", failed, restarts, "<s>", "<s>", running]


def _vary_states(cells: list[str]) -> list[str]:
    return cells[:2] + ["<state>"] + cells[3:8] + ["<running>"]


def _sub(pattern: str, repl: str, flags: int = 0) -> Callable[[str], str]:
    rx = re.compile(pattern, flags)
    return lambda text: rx.sub(repl, text)


def _drop_lines(pattern: str) -> Callable[[str], str]:
    rx = re.compile(pattern)
    return lambda text: "\n".join(line for line in text.splitlines() if not rx.search(line))


def _chain(*fns: Callable[[str], str]) -> Callable[[str], str]:
    def run(text: str) -> str:
        for fn in fns:
            text = fn(text)
        return text
    return run


NORMALISE: dict[str, Callable[[str], str]] = {
    "worker-table": _worker_rows(_vary_counts),
    "worker-states": _worker_rows(_vary_states),
    "queue-timing": _sub(r"^(\s*(?:queue_wait|run_time)_p\d+_s\s+)\S+$", r"\1<s>", re.M),
    "result-timing": _chain(_sub(r"\b(elapsed_s|queue_wait_s|run_time_s)=[-+.e\d]+", r"\1=<s>"),
                            _sub(r"\bworker_id=\d+", "worker_id=<id>")),
    "segment": _chain(_sub(r"_[0-9a-f]{16}\b", "_<hex>"),
                      _sub(r"\bowner pid \d+", "owner pid <pid>")),
    "timings": _sub(r"\b\d+(?:\.\d+)?(?:e-?\d+)? ?s\b", "<s>"),
    "worker-ids": _sub(r"\bon worker \d+", "on worker <id>"),
    "affinity-pids": _sub(r"\(\d+, \(", "(<pid>, ("),
    "interrupt-counts": _sub(r"\b(finished|cancelled): \d+", r"\1: <n>"),
    "cleanup-report": _drop_lines(r"^kept\s"),
}


def normalise(text: str, rules: list[str]) -> str:
    text = "\n".join(line.rstrip() for line in text.strip("\n").splitlines())
    for rule in rules:
        text = NORMALISE[rule](text)
    return text


# -- reading the documents ---------------------------------------------------------------


@dataclasses.dataclass
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    code: str
    markers: list[str]


@dataclasses.dataclass
class Example:
    doc: str
    line: int  # of the first block
    kind: str  # "script", "notebook" or "skip"
    code: str = ""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    outputs: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (line, text)
    rules: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def expected(self) -> str | None:
        return "\n".join(text for _, text in self.outputs) if self.outputs else None


def read_blocks(doc: str) -> list[Block]:
    """The fenced blocks of `doc`, each with the docs-test markers right before it (only
    blank lines between). Raises on a marker that precedes no block."""
    lines = (REPO / doc).read_text().splitlines()
    blocks, markers, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            markers.append(m.group(1))
        elif FENCE.match(line):
            lang = FENCE.match(line).group(1)
            end = i + 1
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"{doc}:{i + 1}: unclosed code block")
            blocks.append(Block(doc, i + 1, lang, "\n".join(lines[i + 1:end]), markers))
            markers, i = [], end
        elif line.strip() and markers:
            raise ValueError(f"{doc}:{i + 1}: a docs-test marker must come right before a code block")
        i += 1
    if markers:
        raise ValueError(f"{doc}: a docs-test marker at the end precedes no code block")
    return blocks


def examples_of(doc: str) -> list[Example]:
    """`doc`'s python blocks as the examples to run, with the outputs they show."""
    examples: list[Example] = []
    last: Example | None = None  # the example the next ```text block would belong to
    for b in read_blocks(doc):
        where = f"{doc}:{b.line}"
        file_match = FILE_BLOCK.match(b.code.split("\n", 1)[0]) if b.lang == "python" else None
        if file_match:
            if last is None or last.kind == "notebook" or b.markers:
                raise ValueError(f"{where}: a '# file:' block must follow the script that uses it, unmarked")
            last.files[file_match.group(1)] = b.code + "\n"
            continue
        if b.lang == "python":
            if len(b.markers) > 1:
                raise ValueError(f"{where}: at most one docs-test marker per block")
            marker = b.markers[0] if b.markers else ""
            skip = re.fullmatch(r"skip\s*\((.+)\)", marker)
            if skip:
                examples.append(Example(doc, b.line, "skip", reason=skip.group(1).strip()))
                last = None  # its output, if it shows one, is not compared either
            elif marker == "continues":
                prev = examples[-1] if examples else None
                if prev is None or prev.kind != "script":
                    raise ValueError(f"{where}: 'continues' needs a script block before it")
                prev.code += "\n" + b.code
                last = prev
            elif marker in ("", "notebook"):
                last = Example(doc, b.line, "notebook" if marker else "script", code=b.code)
                examples.append(last)
            else:
                raise ValueError(f"{where}: unknown docs-test marker {marker!r} on a python block")
            continue
        if b.lang == "text" and last is not None:
            for marker in b.markers:
                m = re.fullmatch(r"normalise\s+(.+)", marker)
                if not m:
                    raise ValueError(f"{where}: unknown docs-test marker {marker!r} on an output block")
                for rule in (r.strip() for r in m.group(1).split(",")):
                    if rule not in NORMALISE:
                        raise ValueError(f"{where}: unknown normalisation {rule!r}; "
                                         f"known: {', '.join(NORMALISE)}")
                    if rule not in last.rules:
                        last.rules.append(rule)
            last.outputs.append((b.line, b.code))
        elif b.markers:
            raise ValueError(f"{where}: docs-test markers on a {b.lang or 'plain'} block that is "
                             "not the output of a python block")
        last = None
    return examples


EXAMPLES = [e for doc in DOCS for e in examples_of(doc)]


# -- running them ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def run_script(ex: Example, workdir: Path) -> str:
    for name, text in ex.files.items():
        (workdir / name).write_text(text)
    (workdir / "example.py").write_text(ex.code + "\n")
    proc = run_python(["-c", RUNNER], cwd=workdir, PYTHONUNBUFFERED="1")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{ex.id} exited with status {proc.returncode}:\n{out}", pytrace=False)
    return out


def notebook_cells(code: str) -> list[str]:
    return [c.strip("\n") for c in re.split(r"\n\s*\n", code) if c.strip()]


def run_notebook(ex: Example, workdir: Path, monkeypatch) -> str:
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits the environment: make it import the mpop under test.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PYDIR), os.environ.get("PYTHONPATH")])))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in notebook_cells(ex.code)]
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(workdir)}})
    with client.setup_kernel():
        _helpers.SPAWNED.add(client.km.provisioner.process.pid)  # may own segments
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    transcript = []
    for number, cell in enumerate(nb.cells, 1):
        for o in cell.outputs:
            if o.get("output_type") == "error":
                raise AssertionError(f"{ex.id}, cell {number}:\n" + "\n".join(o.get("traceback", [])))
            text = o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", "")
            transcript += [f"--- cell {number}", text.rstrip("\n")]
    return "\n".join(transcript)


def compare(ex: Example, actual: str) -> None:
    expected = ex.expected
    if expected is None:
        return  # the documentation shows no output: running without error is the test
    if ex.kind == "notebook":
        expected = re.sub(r"^(--- cell \d+)\b.*$", r"\1", expected, flags=re.M)
    want, got = normalise(expected, ex.rules), normalise(actual, ex.rules)
    if want != got:
        diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(),
                                              "documented", "actual", lineterm=""))
        lines = ", ".join(str(line) for line, _ in ex.outputs)
        pytest.fail(f"{ex.id}: the output differs from {ex.doc} (output block at line {lines}; "
                    f"normalised: {', '.join(ex.rules) or 'nothing'}):\n{diff}\n\nactual output:\n{actual}",
                    pytrace=False)


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e.id)
def test_example(ex: Example, tmp_path, monkeypatch):
    if ex.kind == "skip":
        pytest.skip(f"marked in {ex.doc}: {ex.reason}")
    actual = run_notebook(ex, tmp_path, monkeypatch) if ex.kind == "notebook" else run_script(ex, tmp_path)
    compare(ex, actual)


def test_every_python_block_is_an_example():
    """Each ```python block is run, written as a file for one, or marked skip: none is
    left out by the reading above (which raises on markers it does not know)."""
    for doc in DOCS:
        blocks = [b for b in read_blocks(doc) if b.lang == "python"]
        files = sum(1 for b in blocks if FILE_BLOCK.match(b.code.split("\n", 1)[0]))
        continued = sum(1 for b in blocks if b.markers == ["continues"])
        assert len(examples_of(doc)) == len(blocks) - files - continued, doc


def test_normalisations_are_used():
    """Each normalisation is named by some output block (none lingers unexplained)."""
    used = {rule for ex in EXAMPLES for rule in ex.rules}
    assert used == set(NORMALISE), set(NORMALISE) - used


def test_normalisations_replace_only_what_they_name():
    """Two tables that differ only in what `worker-table` names compare equal; a failure
    count, which it does not name, still counts."""
    header = "id  pid    state     completed  failed  restarts  busy_s  idle_s  running"
    a = f"mpop workers\n{header}\n--  -----  -----\n0   27120  idle      136        0       0         0.089   0.372   -"
    b = f"mpop workers\n{header}\n--  ----  ---------\n0   7      starting  1          0       0         1.000   0.000   -   "
    c = a.replace("136        0 ", "136        1 ")
    assert normalise(a, ["worker-table"]) == normalise(b, ["worker-table"])
    assert normalise(a, ["worker-table"]) != normalise(c, ["worker-table"])
    assert normalise("x 0.175s 1.6 s 20 items", ["timings"]) == "x <s> <s> 20 items"
