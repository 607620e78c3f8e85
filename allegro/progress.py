"""Progress for long commands: a bar on a terminal, nothing in between otherwise.

Commands print their plain summary line themselves; when stderr is not a terminal (cron,
CI, a pipe), the bar would only fill logs with carriage returns, so it is left out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def _noop(n: int = 1) -> None:
    return None


@contextmanager
def progress(
    label: str, *, total: int | None = None, unit: str = "it", stream=None, force: bool = False
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; it moves a tqdm bar on a terminal and does nothing otherwise.

    `unit="B"` scales the numbers as bytes (KiB, MiB).
    """
    stream = stream or sys.stderr
    if not (force or stream.isatty()):
        yield _noop
        return
    scaled = unit == "B"
    with tqdm(
        total=total,
        desc=label,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        file=stream,
        dynamic_ncols=True,
    ) as bar:
        yield bar.update
