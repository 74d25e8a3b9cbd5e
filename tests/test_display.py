"""display=True: run() shows a live status view of the workers while it blocks."""

from __future__ import annotations

import io
import time

import mpop
from mpop._status import LiveView, format_status


def slow(x):
    time.sleep(0.05)
    return x


def test_run_with_display_prints_live_worker_status(capsys):
    with mpop.MpopApi(workers=2, display=True) as app:
        for i in range(30):
            app.enqueue(slow, args=(i,))
        result = app.run()
    assert result.values() == list(range(30))
    out = capsys.readouterr().out
    assert "mpop workers" in out
    assert "mpop queue" in out
    # The last view is drawn after the run: every task finished.
    last = out[out.rindex("mpop queue"):]
    assert "finished              30" in last


def test_display_off_prints_nothing(capsys):
    with mpop.MpopApi(workers=1) as app:
        app.enqueue(slow, args=(1,))
        app.run()
    assert capsys.readouterr().out == ""


def test_live_view_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    class FakeApp:
        def __init__(self):
            self.n = 0

        def status(self):
            self.n += 1
            return {"config": {}, "queue": {"finished": self.n}, "workers": []}

    stream = Tty()
    view = LiveView(FakeApp(), interval=0, stream=stream)
    view.update()
    view.update()
    text = stream.getvalue()
    assert text.count("mpop queue") == 2
    assert "\x1b[" in text  # cursor moved up to redraw over the previous view


def test_format_status_sections():
    status = {"config": {"workers": 3}, "queue": {"capacity": 8, "finished": 2},
              "workers": [{"id": 0, "pid": 1, "state": "idle", "completed": 2, "failed": 0,
                           "restarts": 0, "busy_s": 0.5, "idle_s": 1.0, "running_tsk_id": None}]}
    text = format_status(status)
    assert "mpop config" in text and "workers               3" in text
    assert "capacity              8" in text
    assert "idle" in text
    only_workers = format_status(status, config=False, queue=False)
    assert "mpop config" not in only_workers and "mpop queue" not in only_workers
