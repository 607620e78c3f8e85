import pytest


@pytest.fixture
def published(monkeypatch):
    """Record the batch ids a reprocess publishes instead of talking to a broker."""
    calls: list[list[int]] = []

    def fake_publish(batch_ids, *, timeout=10.0):
        calls.append(sorted(batch_ids))
        return list(batch_ids)

    monkeypatch.setattr("usage_sync.publishing.publish_batches", fake_publish)
    return calls
