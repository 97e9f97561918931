"""Progress that can be silenced with --quiet: a rich bar on a terminal, and on a pipe
(nohup, a batch job's log) a plain line every minute, since a study runs for hours."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class UI:
    #: How often a piped run reports a bar's progress, in seconds.
    log_every_s: float = 60.0

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            console.print(message, highlight=False)

    @contextlib.contextmanager
    def bar(self, total: int, description: str, completed: int = 0) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n, note)``. ``completed``: units done before (a resumed run);
        they count toward the total but not toward the rate, so the time left stays true."""
        if self.quiet:
            yield lambda n=1, note=None: None
        elif not sys.stderr.isatty():
            yield self._lines(total, description, completed)
        else:
            progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                console=console, transient=True,
            )
            with progress:
                tid = progress.add_task(description, total=total, completed=completed, note="")

                def advance(n: int = 1, note: str | None = None) -> None:
                    progress.update(tid, advance=n, **({"note": note} if note is not None else {}))

                yield advance

    def _lines(self, total: int, description: str, completed: int) -> Callable[..., None]:
        start = last = time.monotonic()
        done = completed

        def advance(n: int = 1, note: str | None = None) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last < self.log_every_s or done >= total:
                return
            last = now
            rate = (done - completed) / (now - start)
            left = f", ~{_duration((total - done) / rate)} left" if rate > 0 else ""
            # soft_wrap: a log line stays one line, whatever width rich assumes for a pipe.
            console.print(f"  {description}: {done}/{total} ({100 * done / total:.0f}%), "
                          f"{_duration(now - start)}{left}" + (f", {note}" if note else ""),
                          highlight=False, soft_wrap=True)

        return advance
