"""Where notes, warnings and progress go: one object instead of log/quiet/progress flags on every function.

Results go to stdout (the CLI prints them); a Console writes only to stderr. Calling it is the same as `note`,
so any function that takes a `log` callable takes a Console.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


class Console:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream)

    __call__ = note

    def warn(self, message: str) -> None:
        """A warning is printed even with --quiet: it says a result may not mean what it seems to."""
        print(f"warning: {message}", file=self.stream)

    @property
    def shows_progress(self) -> bool:
        return not self.quiet

    def track(self, items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
        """`items`, with a progress bar on stderr unless quiet."""
        if self.quiet:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit, total=total, leave=False, file=self.stream)

    @contextmanager
    def seconds_bar(self, total_s: float, desc: str) -> Iterator[Callable[[float], None]]:
        """A bar over seconds of work; yields a function taking the seconds done so far."""
        if self.quiet:
            yield lambda done: None
            return
        from tqdm import tqdm

        with tqdm(total=round(total_s, 1), desc=desc, unit="s", leave=False, file=self.stream,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s") as bar:
            def update(done: float) -> None:
                bar.n = min(round(done, 1), bar.total)
                bar.refresh()

            yield update


SILENT = Console(quiet=True)
