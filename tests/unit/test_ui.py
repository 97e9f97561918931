"""Progress on a pipe: a study runs for hours under nohup, where no bar is drawn."""

from __future__ import annotations

import pytest

from retain import ui as ui_module
from retain.ui import UI


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(ui_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(ui_module.sys.stderr, "isatty", lambda: False, raising=False)
    return now


def test_a_piped_bar_prints_a_line_a_minute_with_the_time_left_from_this_run_alone(clock, capsys):
    with UI().bar(10, "train parity+magnitude+has-seven+odd-lead", completed=4) as advance:  # resumed after 4 of 10
        clock[0] += 30
        advance(1, "loss 0.5")
        assert capsys.readouterr().err == ""  # under a minute: nothing yet
        clock[0] += 31
        advance(1, "loss 0.4")
        # 2 steps in 61 s since the bar opened (the 4 resumed ones do not count): 4 left, 122 s.
        assert capsys.readouterr().err == ("  train parity+magnitude+has-seven+odd-lead: 6/10 (60%), 1m01s, ~2m02s left, "
                                             "loss 0.4\n")  # one line, however long
        clock[0] += 10
        advance(1)
        assert capsys.readouterr().err == ""  # 10 s after the last line
        clock[0] += 3600
        advance(3)  # done: the caller reports the result
    assert capsys.readouterr().err == ""


def test_quiet_prints_nothing_however_long(clock, capsys):
    with UI(quiet=True).bar(3, "eval") as advance:
        clock[0] += 600
        advance(1)
    assert capsys.readouterr().err == ""
