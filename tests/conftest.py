"""Shared fixtures. Tests run on the PostgreSQL of DATABASE_URL (`make test` finds one)."""

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import UserFactory, grant_reprocess
from tests.services import AUTH_KEY, CLIENT_NO, TANSU_ASSIGNMENT, Broker, Simulator


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def api_client(user):
    """An API client authenticated with the user's DRF token."""
    client = APIClient()
    token = Token.objects.create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def broker(tmp_path):
    """A fresh in-memory Kafka-protocol broker (tansu) on a free port."""
    broker = Broker(log=tmp_path / "tansu.log").start()
    yield broker
    broker.stop()


@pytest.fixture
def kafka(broker, settings):
    """Point the app at the test broker, with a topic of its own."""
    import uuid

    settings.KAFKA_BOOTSTRAP_SERVERS = broker.bootstrap
    settings.KAFKA_AGGREGATED_TOPIC = f"aggregated-{uuid.uuid4().hex[:8]}"
    settings.KAFKA_AGGREGATED_TOPIC_PARTITIONS = 3
    settings.KAFKA_PARTITION_ASSIGNMENT_STRATEGY = TANSU_ASSIGNMENT
    return broker


@pytest.fixture
def simulator(tmp_path):
    """The core Aria simulator process, with the credentials SyncStack's workers use."""
    simulator = Simulator(
        "--client-no", str(CLIENT_NO), "--auth-key", AUTH_KEY, log=tmp_path / "simulator.log"
    ).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def published(monkeypatch):
    """Record the batch ids a reprocess publishes instead of talking to a broker."""
    calls: list[list[int]] = []

    def fake_publish(batch_ids, *, timeout=10.0):
        calls.append(sorted(batch_ids))
        return list(batch_ids)

    monkeypatch.setattr("usage_sync.publishing.publish_batches", fake_publish)
    return calls


@pytest.fixture
def operator(db):
    """A user allowed to reprocess."""
    user = UserFactory()
    grant_reprocess(user)
    return user
