"""The sample Grafana dashboard queries only metrics /metrics exposes, and shows them all."""

import json
import re

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from reprocess import metrics as reprocess_metrics
from tests.services import ROOT
from usage_sync import metrics
from usage_sync.publishing import ensure_topic

DASHBOARD = ROOT / "docs" / "grafana" / "allegro-usage-sync.json"
METRIC_NAME = re.compile(r"\ballegro_[a-z0-9_]+\b")
# prometheus_client's per-series creation timestamps; not something to chart.
NOT_CHARTED = re.compile(r"_created$")

pytestmark = pytest.mark.django_db


@pytest.fixture
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queried_names(dashboard: dict) -> set[str]:
    return {
        name
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        for name in METRIC_NAME.findall(target["expr"])
    }


@pytest.fixture
def every_series(kafka, settings):
    """Give every labelled series at least one sample: a call, an outcome, a reprocess
    run, and a topic with a committed offset."""
    metrics.observe_call("bulk_record_usage_m", 0.1, "0")
    metrics.RECORD_OUTCOMES.labels("COMPLETE", "0").inc()
    reprocess_metrics.REPROCESS_RUNS.labels("BATCH").inc()
    ensure_topic(partitions=1, timeout=10)
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    producer.produce(settings.KAFKA_AGGREGATED_TOPIC, value=b"1")
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap,
                         "group.id": settings.KAFKA_CONSUMER_GROUP})
    try:
        consumer.commit(offsets=[TopicPartition(settings.KAFKA_AGGREGATED_TOPIC, 0, 1)],
                        asynchronous=False)
    finally:
        consumer.close()


def test_the_dashboard_uses_a_prometheus_datasource_variable(dashboard):
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == f"${{{variable['name']}}}", panel["title"]
            assert panel["targets"], panel["title"]


def test_every_metric_the_dashboard_queries_is_exposed(
    dashboard, single_process, every_series, scrape
):
    exposed = scrape().names()

    assert queried_names(dashboard) - exposed == set()


def test_every_exposed_metric_has_a_panel(dashboard, single_process, every_series, scrape):
    queried = queried_names(dashboard)
    families = {
        family.name
        for family in scrape().families
        if family.name.startswith("allegro_") and not NOT_CHARTED.search(family.name)
    }

    missing = {f for f in families if not any(name.startswith(f) for name in queried)}

    assert missing == set()
