import os
import signal
import threading

from django.core.management.base import BaseCommand

from usage_sync.consumer import consume_batches


class Command(BaseCommand):
    help = (
        "Consume aggregated batch ids from Kafka and sync each batch, until SIGTERM or "
        "SIGINT (it finishes the batch in hand first). Each Celery worker runs "
        "SYNC_CONSUMERS_PER_WORKER of these itself; run it by hand only to sync without one."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--parent", type=int, help="Stop once the process with this pid is gone (the worker)."
        )
        parser.add_argument(
            "--member",
            help="Join the consumer group as this static member (unique in the group, the "
            "same across restarts); default: a dynamic member.",
        )

    def handle(self, *args, parent=None, member=None, **options):
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

        def should_stop() -> bool:
            # An orphan (its worker was killed) must not sync on with nobody watching it.
            return stop.is_set() or (parent is not None and os.getppid() != parent)

        handled = consume_batches(should_stop=should_stop, member=member)
        self.stdout.write(f"consumer {os.getpid()} stopped after {handled} batch ids")
