"""Progress display that suits where it goes: a live bar on a terminal, plain lines in a log.

tqdm's bar redraws one line with carriage returns and cursor escapes; written to a file or a
pipe those become noise (``\\x1b[A``) and an error message lands glued to a bar. When stderr is
not a terminal, :func:`progress_bar` prints a plain, complete line now and then instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["PlainProgress", "progress_bar"]

LINE_EVERY_S = 30.0
"""Seconds between plain progress lines (the first and last are always printed)."""


class PlainProgress:
    """The part of tqdm's interface the project uses, printing whole lines to ``stream``."""

    def __init__(
        self, total: int, desc: str, unit: str, *, stream: TextIO | None = None,
        every: float = LINE_EVERY_S,
    ) -> None:  # fmt: skip
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.start = time.perf_counter()
        self.last = -float("inf")
        self.finished = False

    def update(self, n: int = 1) -> None:
        """Advance by ``n``; print a line if enough time passed or the work just got done."""
        if n <= 0:
            return
        self.n += n
        now = time.perf_counter()
        done = self.n >= self.total
        if now - self.last >= self.every or (done and not self.finished):
            self.last = now
            self.finished = done
            self._line(now)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Text shown after the counts on the next line."""
        self.postfix = text

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """``key=value`` pairs shown after the counts on the next line."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Nothing to clear: every line is already complete."""

    def _line(self, now: float) -> None:
        percent = 100.0 * self.n / self.total if self.total else 100.0
        extra = f", {self.postfix}" if self.postfix else ""
        self.stream.write(
            f"{self.desc}: {self.n}/{self.total} {self.unit}s ({percent:.0f}%), "
            f"{now - self.start:.0f}s{extra}\n"
        )
        self.stream.flush()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int, desc: str, unit: str, *, enabled: bool = True, leave: bool = True
) -> Any:
    """A tqdm bar on a terminal, :class:`PlainProgress` lines otherwise, nothing if disabled."""
    if enabled and not _is_terminal(sys.stderr):
        return PlainProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
