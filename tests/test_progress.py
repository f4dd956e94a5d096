"""Progress output: a bar on a terminal, a line now and then in a log (mambaprune.progress)."""
import io

import pytest

from mambaprune.progress import LogProgress, progress_bar


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_log_progress_writes_one_line_per_interval_and_nothing_at_the_end():
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=10, desc="eval", unit="sample", file=out, interval=60, clock=clock)
    for step in range(10):
        clock.t = 25.0 * (step + 1)      # updates at 25, 50, ..., 250 s: lines at 75 (>= 60), 150, 225
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["eval: 3/10 sample (30%), 75 s", "eval: 6/10 sample (60%), 150 s", "eval: 9/10 sample (90%), 225 s"]
    assert "\r" not in out.getvalue()


def test_a_short_job_leaves_no_trace_in_a_log(monkeypatch):
    monkeypatch.delenv("MAMBAPRUNE_PROGRESS", raising=False)
    out = io.StringIO()
    items = list(progress_bar(range(5), desc="std curve", file=out, leave=False))
    assert items == [0, 1, 2, 3, 4] and out.getvalue() == ""


def test_interval_zero_and_disable_write_nothing(monkeypatch):
    monkeypatch.setenv("MAMBAPRUNE_PROGRESS_INTERVAL", "0")
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=3, file=out, clock=clock)
    clock.t = 1e6
    bar.update(3)
    assert out.getvalue() == ""
    monkeypatch.setenv("MAMBAPRUNE_PROGRESS_INTERVAL", "1e-9")
    quiet = progress_bar(range(3), disable=True, file=out)
    assert list(quiet) == [0, 1, 2] and out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_and_the_environment_can_force_either(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("MAMBAPRUNE_PROGRESS", raising=False)
    assert isinstance(progress_bar(total=3, file=FakeTerminal()), tqdm)
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LogProgress)
    monkeypatch.setenv("MAMBAPRUNE_PROGRESS", "log")
    assert isinstance(progress_bar(total=3, file=FakeTerminal()), LogProgress)
    monkeypatch.setenv("MAMBAPRUNE_PROGRESS", "bar")
    assert isinstance(progress_bar(total=3, file=io.StringIO()), tqdm)


def test_a_bad_interval_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MAMBAPRUNE_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="MAMBAPRUNE_PROGRESS_INTERVAL"):
        LogProgress(total=1, file=io.StringIO())
