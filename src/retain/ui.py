"""Progress bars (rich) that can be silenced with --quiet."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class UI:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            console.print(message, highlight=False)

    @contextlib.contextmanager
    def bar(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n)``; a transient bar on a terminal, nothing when quiet or piped."""
        if self.quiet or not sys.stderr.isatty():
            yield lambda n=1, note=None: None
            return
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
            console=console, transient=True,
        )
        with progress:
            tid = progress.add_task(description, total=total, note="")

            def advance(n: int = 1, note: str | None = None) -> None:
                progress.update(tid, advance=n, **({"note": note} if note is not None else {}))

            yield advance
