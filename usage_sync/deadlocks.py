"""Run a transaction again when PostgreSQL rolled it back to break a deadlock.

Every writer here takes its row locks in one order, yet a writer outside that order (an
older client, a script, a close against a late ingest) can still deadlock with one.
PostgreSQL then rolls one of them back (SQLSTATE 40P01), and that one can simply run again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from django.db import OperationalError

logger = logging.getLogger(__name__)

DEADLOCK_DETECTED = "40P01"
T = TypeVar("T")


def run_again_on_deadlock(work: Callable[[], T], *, attempts: int, what: str) -> T:
    """Return work(), run up to `attempts` times while it is rolled back by a deadlock."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except OperationalError as exc:
            if getattr(exc.__cause__, "sqlstate", None) != DEADLOCK_DETECTED:
                raise
            if attempt == attempts:
                raise
            logger.warning("%s deadlocked with a concurrent writer; running it again "
                           "(attempt %d of %d)", what, attempt + 1, attempts)
    raise AssertionError("unreachable")
