"""manage.py reprocess."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from reprocess.models import ReprocessRun
from tests.factories import make_batch
from usage_sync.models import UsageRecord

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command("reprocess", *args, stdout=out)
    return out.getvalue()


def test_it_reprocesses_everything_and_prints_the_run(published):
    make_batch(complete=1, errors={"1009": 2})
    make_batch(errors={"1017": 1})

    output = run("--all", "--reason", "fixed in Aria")

    run_ = ReprocessRun.objects.get()
    assert output.strip() == f"Reprocess run {run_.pk} (All): queued 3 records in 2 batches."
    assert (run_.reason, run_.actor.startswith("cli:")) == ("fixed in Aria", True)
    assert not UsageRecord.objects.filter(status="ERROR").exists()


def test_it_reprocesses_one_summary_group(published):
    batch = make_batch(errors={"1009": 2, "1017": 1})

    output = run("--batch", str(batch.id), "--error-code", "1009", "--status", "error")

    assert "queued 2 records in 1 batches" in output
    assert UsageRecord.objects.filter(status="ERROR").count() == 1


def test_a_dry_run_only_counts(published):
    batch = make_batch(errors={"1009": 2})

    output = run("--batch", str(batch.id), "--dry-run")

    assert output.strip() == (
        f"Dry run (Batch {batch.id}): would queue up to 2 records in 1 batches."
    )
    assert not ReprocessRun.objects.exists()
    assert UsageRecord.objects.filter(status="ERROR").count() == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "999999"], "Batch 999999 does not exist."),
        (["--all", "--status", "ERROR"], "go with --batch"),
        (["--batch", "1", "--error-code", "1009"], "--error-code needs --status"),
    ],
)
def test_bad_arguments_fail_with_the_reason(published, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
