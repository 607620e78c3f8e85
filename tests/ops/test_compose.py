"""docker-compose.yml, parsed: the whole production stack, each service supervised.

Docker is not available where the tests run, so this checks the file's structure: what
`docker compose config` cannot tell either (a service without a health check, a setting
the application reads but the stack never passes on).
"""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.ops.settings_env import settings_env_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ["migrate", "web", "worker", "beat", "flower"]
# Read by the settings but deliberately not passed on: it runs Celery tasks inline, which
# only tests want.
# Tests only; and where the image collected its static files at build (fixed in the image).
NOT_FOR_PRODUCTION = {"CELERY_TASK_ALWAYS_EAGER", "STATIC_ROOT"}


def test_it_runs_the_whole_stack():
    assert set(SERVICES) == {
        "postgres", "redis", "kafka", "migrate", "web", "worker", "beat", "flower"
    }


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_restart_policy(name):
    assert re.fullmatch(r"unless-stopped|always|on-failure(:\d+)?", SERVICES[name]["restart"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_long_running_service_has_a_health_check(name):
    healthcheck = SERVICES[name]["healthcheck"]
    if healthcheck.get("disable"):
        # Only a one-shot may go without: the others wait for it to complete instead.
        waited_for = [
            s["depends_on"][name]["condition"]
            for s in SERVICES.values()
            if name in s.get("depends_on", {})
        ]
        assert waited_for and set(waited_for) == {"service_completed_successfully"}
        assert SERVICES[name]["restart"].startswith("on-failure")
    else:
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL")
        assert {"interval", "timeout", "retries"} <= healthcheck.keys()


def test_kafka_is_apache_kafka_in_kraft_mode():
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"


def test_postgresql_keeps_its_data_in_a_named_volume():
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "postgres-data" in COMPOSE["volumes"]


@pytest.mark.parametrize("name", ["web", "worker", "beat"])
def test_the_application_waits_for_healthy_services_and_the_migrations(name):
    depends_on = SERVICES[name]["depends_on"]
    for service in ("postgres", "redis", "kafka"):
        assert depends_on[service]["condition"] == "service_healthy"
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_the_web_container_is_probed_on_its_liveness_endpoint():
    test = " ".join(SERVICES["web"]["healthcheck"]["test"])
    assert "http://localhost:8000/healthz/live" in test
    assert "gunicorn" in SERVICES["web"]["command"]
    # The probe calls the server by "localhost", so that host is always allowed.
    assert SERVICES["web"]["environment"]["ALLOWED_HOSTS"].endswith(",localhost")


def test_the_worker_health_check_pings_this_worker():
    assert "inspect ping --destination celery@$$HOSTNAME" in (
        SERVICES["worker"]["healthcheck"]["test"][1]
    )


def test_beat_is_unhealthy_when_its_schedule_file_goes_stale():
    test = SERVICES["beat"]["healthcheck"]["test"]
    assert "/app/var/celerybeat-schedule" in " ".join(test)
    assert "--schedule=/app/var/celerybeat-schedule" in SERVICES["beat"]["command"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_setting_the_application_reads_is_passed_to_it(name):
    environment = SERVICES[name]["environment"]
    missing = settings_env_names() - NOT_FOR_PRODUCTION - set(environment)
    assert not missing, f"{name} does not pass on {sorted(missing)}"


def test_the_proxy_header_defaults_to_x_forwarded_proto_but_can_be_emptied():
    # "${VAR-default}", not "${VAR:-default}": an empty value in .env must stay empty.
    value = SERVICES["web"]["environment"]["SECURE_PROXY_SSL_HEADER"]
    assert value == "${SECURE_PROXY_SSL_HEADER-X-Forwarded-Proto}"


def test_production_runs_without_debug_and_with_json_logs():
    environment = SERVICES["web"]["environment"]
    assert environment["DEBUG"] == "false"
    assert environment["LOG_FORMAT"] == "${LOG_FORMAT:-json}"
    assert "CELERY_TASK_ALWAYS_EAGER" not in environment


def test_web_and_worker_share_one_in_memory_metrics_directory():
    directory = SERVICES["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    mount = f"metrics:{directory}"
    assert mount in SERVICES["web"]["volumes"]
    assert mount in SERVICES["worker"]["volumes"]
    assert COMPOSE["volumes"]["metrics"]["driver_opts"]["type"] == "tmpfs"
    for name in ("migrate", "beat", "flower"):
        # They write metrics files too; the directory must exist in their containers.
        [volume] = [v for v in SERVICES[name]["volumes"] if isinstance(v, dict)]
        assert (volume["type"], volume["target"]) == ("tmpfs", directory)


def test_each_deploy_refreshes_the_static_files_the_proxy_serves():
    migrate = SERVICES["migrate"]
    assert "static:/app/var/static" in migrate["volumes"]
    assert "collectstatic --noinput" in migrate["command"][-1]
    assert "static" in COMPOSE["volumes"]


def test_flower_is_optional_and_alone_installs_the_flower_extra():
    flower = SERVICES["flower"]
    assert flower["profiles"] == ["flower"]
    assert flower["build"]["args"]["EXTRAS"] == "flower"
    assert flower["image"] != SERVICES["web"]["image"]
    assert all("profiles" not in SERVICES[name] for name in SERVICES if name != "flower")
    assert all("args" not in SERVICES[name]["build"] for name in APP_SERVICES[:-1])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("flower") for dep in extras["flower"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ARG EXTRAS=""' in dockerfile
    assert "optional-dependencies" in dockerfile


def test_every_variable_the_compose_file_takes_is_documented_in_the_deploy_guide():
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_0-9]+)", text))
    passed_on = {
        name
        for service in SERVICES.values()
        for name, value in (service.get("environment") or {}).items()
        if value is None
    }
    guide = (ROOT / "docs" / "deploy.md").read_text()
    undocumented = sorted(
        name for name in interpolated | passed_on if f"`{name}`" not in guide
        and name not in _readme_configuration_names()
    )
    assert not undocumented


def _readme_configuration_names() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `([A-Z_0-9]+)` \|", readme, flags=re.MULTILINE))


def test_the_image_copies_every_directory_the_application_needs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for directory in ("allegro", "usage_sync", "reprocess", "templates"):
        assert (ROOT / directory).is_dir()
        assert f"COPY {directory} ./{directory}" in dockerfile


def test_the_image_leaves_the_development_tooling_out():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE)
    assert "devtools" not in " ".join(copied)
    assert "devtools" in (ROOT / ".dockerignore").read_text().split()
