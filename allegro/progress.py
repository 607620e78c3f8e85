"""Progress for long commands: a bar on a terminal, nothing in between otherwise.

Commands print their plain summary line themselves; when stderr is not a terminal (cron,
CI, a pipe), the bar would only fill logs with carriage returns, so it is left out.
While a bar is shown, log lines of the root logger's console handler are written above it
instead of through it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class Advance(Protocol):
    def __call__(self, n: int = 1, *, note: str | None = None) -> None: ...


def _noop(n: int = 1, *, note: str | None = None) -> None:
    return None


@contextmanager
def progress(
    label: str, *, total: int | None = None, unit: str = "it", stream=None, force: bool = False
) -> Iterator[Advance]:
    """Yield `advance(n, note=…)`; it moves a tqdm bar on a terminal and does nothing otherwise.

    `note` names the step under way, shown after the bar. `unit="B"` scales the numbers
    as bytes (KiB, MiB).
    """
    stream = stream or sys.stderr
    if not (force or stream.isatty()):
        yield _noop
        return
    scaled = unit == "B"
    with logging_redirect_tqdm(), tqdm(
        total=total,
        desc=label,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        file=stream,
        dynamic_ncols=True,
    ) as bar:

        def advance(n: int = 1, *, note: str | None = None) -> None:
            if note is not None:
                bar.set_postfix_str(note, refresh=not n)
            if n:
                bar.update(n)

        yield advance
