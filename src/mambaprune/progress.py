"""Progress bars that redraw on a terminal and stay quiet in a log.

On a terminal, :func:`progress_bar` is a tqdm bar. When the output is a file or a pipe (a log, CI, ``nohup``), a
redrawn bar writes one carriage-return line per update, which turns a log into hundreds of bar fragments; there it
is a :class:`LogProgress` instead, which writes one plain line at most every ``interval`` seconds (default 60,
``MAMBAPRUNE_PROGRESS_INTERVAL`` overrides it; 0 writes none) and nothing at the end, so a job shorter than the
interval leaves no trace and a long one leaves a line a minute. ``MAMBAPRUNE_PROGRESS=bar`` or ``=log`` forces
one kind.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TextIO

DEFAULT_INTERVAL = 60.0


def _interval() -> float:
    text = os.environ.get("MAMBAPRUNE_PROGRESS_INTERVAL")
    if text is None:
        return DEFAULT_INTERVAL
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"MAMBAPRUNE_PROGRESS_INTERVAL must be a number of seconds, got {text!r}") from None


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` redraws (a terminal), as ``MAMBAPRUNE_PROGRESS`` may force."""
    forced = os.environ.get("MAMBAPRUNE_PROGRESS", "").lower()
    if forced in ("bar", "log"):
        return forced == "bar"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """The part of tqdm's interface the toolkit uses, writing a plain line now and then instead of redrawing.

    ``clock`` is the time source (a test passes a fake one)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: TextIO | None = None, interval: float | None = None,
                 clock=time.monotonic, **_ignored):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = file if file is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.clock = clock
        self.start = self.last = clock()
        self.postfix = ""

    def _line(self) -> str:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        elapsed = self.clock() - self.start
        post = f", {self.postfix}" if self.postfix else ""
        label = f"{self.desc}: " if self.desc else ""
        return f"{label}{done} {self.unit}{share}, {elapsed:.0f} s{post}"

    def _maybe_write(self) -> None:
        if self.interval <= 0:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            print(self._line(), file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_write()

    def set_description_str(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc
        self._maybe_write()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.set_description_str(desc, refresh)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Disabled(LogProgress):
    def _maybe_write(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, file: TextIO | None = None, **options):
    """A tqdm bar on a terminal, a :class:`LogProgress` elsewhere, a silent pass-through when ``disable``.

    ``options`` are tqdm's (``total``, ``desc``, ``unit``, ``initial``, ``leave``, ``bar_format``)."""
    stream = file if file is not None else sys.stderr
    if disable:
        return _Disabled(iterable, file=stream, **options)
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, file=stream, **options)
    return LogProgress(iterable, file=stream, **options)
