"""Helpers for the observability tests: scrape /metrics and read samples from it."""

import pytest
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """The samples of one /metrics answer, by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for family in self.families for s in family.samples]

    def names(self) -> set[str]:
        """Every sample name (counters' `_total`, histograms' `_bucket`, … included)."""
        return {s.name for s in self.samples}

    def total(self, name: str, **labels) -> float:
        """Sum the samples of `name` whose labels include `labels` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str, **labels) -> bool:
        return any(
            s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            for s in self.samples
        )


@pytest.fixture
def scrape(client):
    """GET /metrics and parse it; fail on anything but a 200."""

    def get(**headers) -> Scrape:
        response = client.get("/metrics", **headers)
        assert response.status_code == 200, response.content
        assert response["Content-Type"].startswith("text/plain; version=")
        return Scrape(response.content.decode())

    return get


@pytest.fixture
def single_process(monkeypatch):
    """The counters of this process, as /metrics serves them without multiprocess mode."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


@pytest.fixture
def broker_down(settings):
    """Point the app at a port nothing listens on, with short timeouts."""
    from tests.services import free_port

    settings.KAFKA_BOOTSTRAP_SERVERS = f"127.0.0.1:{free_port()}"
    settings.METRICS_KAFKA_TIMEOUT_SECONDS = 1.0
    settings.HEALTH_CHECK_TIMEOUT_SECONDS = 1.0
