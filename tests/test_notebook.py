"""mpop in a Jupyter notebook: handlers defined in cells, submit/map, the status views and
shutdown, executed by a real kernel through nbclient."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

import _helpers
from _helpers import PYDIR, leak_check

CELLS = [
    # 0: the kernel finds this checkout's mpop however it was started
    f"import sys\nsys.path.insert(0, {str(PYDIR)!r})\nimport mpop\nprint('mpop', mpop.__version__)",
    # 1: a handler defined in a cell (lives in the kernel's __main__)
    "def handler(x, k=1):\n    return x * 3 + k",
    # 2
    "app = mpop.MpopApi(workers=2, auto_terminate=False)\n"
    "fut = app.submit(handler, 4, k=2)\n"
    "print('submit', fut.result(timeout=60))",
    # 3
    "print('map', list(app.map(handler, range(6))))",
    # 4: a lambda and a closure from cells
    "offset = 100\n"
    "print('lambda', app.submit(lambda v: v + offset, 1).result(timeout=60))\n"
    "print('unordered', sorted(app.map(lambda v: -v, range(4), ordered=False)))",
    # 5
    "app.print_status()",
    # 6: the classic enqueue/run loop with a handler from a cell
    "for i in range(5):\n"
    "    app.enqueue(handler, args=(i,), tsk_id=i)\n"
    "print('run', app.run().values())",
    # 7
    "name = app.segment_name\n"
    "app.shutdown()\n"
    "import os\n"
    "print('shutdown', app.segment_name, os.path.exists('/dev/shm/' + name))",
    # 8: the live view while run() blocks, shown in the notebook
    "live = mpop.MpopApi(workers=1, display=True)\n"
    "for i in range(3):\n"
    "    live.enqueue(mpop.ProcTaskFnID.INCREMENT, args=(i,))\n"
    "print('display-run', live.run().values())\n"
    "live.shutdown()",
    # 9: a progress bar in a notebook does not break map
    "with mpop.MpopApi(workers=1) as a:\n"
    "    print('progress', sum(a.map(handler, range(10), progress=True)))",
]


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return data.get("text/plain", "")


def test_notebook_end_to_end(monkeypatch, tmp_path):
    # The kernel inherits the environment: make it find this checkout's mpop too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PYDIR), os.environ.get("PYTHONPATH")])))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        _helpers.SPAWNED.add(client.km.provisioner.process.pid)  # may own segments
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    outs = ["".join(_text(o) for o in cell.outputs) for cell in nb.cells]
    errors = [o for cell in nb.cells for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors, errors

    assert outs[0].startswith("mpop ")
    assert outs[2].strip() == "submit 14"
    assert outs[3].strip() == "map [1, 4, 7, 10, 13, 16]"
    assert outs[4].splitlines() == ["lambda 101", "unordered [-3, -2, -1, 0]"]
    for title in ("mpop config", "mpop queue", "mpop workers"):
        assert title in outs[5]
    assert outs[6].strip() == "run [1, 4, 7, 10, 13]"
    assert outs[7].strip() == "shutdown None False"
    # display=True in a notebook: an updatable display output with the status view.
    displays = [o for o in nb.cells[8].outputs if o.get("output_type") == "display_data"]
    assert displays, nb.cells[8].outputs
    assert any("mpop workers" in _text(o) for o in displays), displays
    assert "display-run [1, 2, 3]" in outs[8]
    assert "progress 145" in outs[9]


OUTPUT_CELLS = [
    # 0
    f"import sys, logging\nsys.path.insert(0, {str(PYDIR)!r})\nimport mpop",
    # 1: the notebook's own logging configuration (a handler on the kernel's stderr)
    "logging.basicConfig(level=logging.WARNING, format='LOG %(levelname)s %(name)s %(message)s')",
    # 2: handlers defined in a cell
    "def loud(x):\n"
    "    print(f'worker prints {x}')\n"
    "    sys.stderr.write(f'worker err {x}\\n')\n"
    "    return 2 * x\n"
    "\n"
    "def logs(x):\n"
    "    logging.getLogger('nbworker').warning('worker logged %s', x)\n"
    "    return x",
    # 3
    "app = mpop.MpopApi(workers=1, auto_terminate=False)\n"
    "print('result', app.submit(loud, 1).result(timeout=60))",
    # 4: a later cell (the app and its threads were made in another one)
    "print('result', app.submit(loud, 2).result(timeout=60))",
    # 5
    "print('logged', app.submit(logs, 3).result(timeout=60))",
    # 6
    "print('map', list(app.map(loud, [4, 5])))",
    # 7
    "app.enqueue(loud, args=(6,))\n"
    "print('run', app.run().values())",
    # 8
    "app.shutdown()",
]


def _streams(cell, name: str) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.get("output_type") == "stream" and o.get("name") == name)


def test_notebook_cells_show_worker_output_and_logging(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PYDIR), os.environ.get("PYTHONPATH")])))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in OUTPUT_CELLS]
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        _helpers.SPAWNED.add(client.km.provisioner.process.pid)  # may own segments
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    errors = [o for cell in nb.cells for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    out = [_streams(cell, "stdout") for cell in nb.cells]
    err = [_streams(cell, "stderr") for cell in nb.cells]
    everything = [cell.outputs for cell in nb.cells]
    # The cells' own output.
    assert "result 2\n" in out[3] and "result 4\n" in out[4] and "logged 3" in out[5], everything
    assert "map [8, 10]" in out[6] and "run [12]" in out[7], everything
    # What the tasks printed and logged is shown by the notebook, each text once, on its
    # stream (the cell it lands in is ipykernel's to choose for text written by mpop's
    # result thread; usually the cell that ran the task).
    all_out, all_err = "".join(out), "".join(err)
    for text in ("worker prints 1\n", "worker prints 2\n", "worker prints 4\n", "worker prints 5\n",
                 "worker prints 6\n"):
        assert all_out.count(text) == 1, (text, everything)
    for text in ("worker err 1\n", "worker err 2\n", "LOG WARNING nbworker worker logged 3\n"):
        assert all_err.count(text) == 1, (text, everything)
    assert "worker prints" not in all_err and "worker err" not in all_out, everything


def test_the_example_notebook_runs_and_shows_tables_and_a_progress_total(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PYDIR), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(_helpers.EXAMPLES / "notebook.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        _helpers.SPAWNED.add(client.km.provisioner.process.pid)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                client.execute_cell(cell, index)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    app_html = code[1].outputs[0]["data"]["text/html"]  # `app`: its repr over its status
    assert "&lt;MpopApi workers=2" in app_html and "<table>" in app_html and "mpop workers" in app_html
    progress = _streams(code[2], "stderr")
    assert "5/5" in progress, progress  # a total for a sized input
    assert code[2].outputs[-1]["data"]["text/plain"] == "[0, 1, 4, 9, 16]"
    status_html = code[3].outputs[0]["data"]["text/html"]
    assert status_html.count("<table>") == 3 and "mpop queue" in status_html
