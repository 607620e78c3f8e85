"""With production environment (DEBUG off), the deploy checks pass and every response
carries the security headers and secure cookies. Each case starts a fresh process, since
settings.py reads the environment once."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST = "allegro.example.com"
SECURITY_VARIABLES = (
    "SECURE_SSL_REDIRECT", "SECURE_PROXY_SSL_HEADER", "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE", "CSRF_TRUSTED_ORIGINS", "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD",
)


# Production pages name content-hashed static files, so the files must be collected first,
# as the image does at build.
STATIC_ROOT = Path(tempfile.mkdtemp(prefix="allegro-static-"))


def production_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_VARIABLES}
    env.update(DEBUG="false", SECRET_KEY=secrets.token_urlsafe(64), ALLOWED_HOSTS=HOST,
               DJANGO_SETTINGS_MODULE="allegro.settings", STATIC_ROOT=str(STATIC_ROOT))
    env.update(overrides)
    return env


@pytest.fixture(scope="module", autouse=True)
def collected_static():
    result = run(["manage.py", "collectstatic", "--noinput", "-v0"], production_env())
    assert result.returncode == 0, result.stderr
    yield
    shutil.rmtree(STATIC_ROOT, ignore_errors=True)


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def deploy_check(**overrides: str) -> subprocess.CompletedProcess:
    return run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
               production_env(**overrides))


def test_the_deploy_checks_pass_in_production():
    result = deploy_check()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"SECRET_KEY": "short-and-guessable"}, "security.W009"),
        ({"SESSION_COOKIE_SECURE": "false"}, "security.W012"),
        ({"CSRF_COOKIE_SECURE": "false"}, "security.W016"),
        ({"SECURE_HSTS_SECONDS": "0"}, "security.W004"),
        ({"SECURE_SSL_REDIRECT": "false"}, "security.W008"),
    ],
)
def test_the_deploy_check_fails_when_a_protection_is_turned_off(overrides, warning):
    result = deploy_check(**overrides)

    assert result.returncode != 0
    assert warning in result.stderr + result.stdout


def test_debug_off_without_a_secret_key_does_not_start():
    env = production_env()
    del env["SECRET_KEY"]

    result = run(["manage.py", "check"], env)

    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


PROBE = f"""
import json
import django
django.setup()
from django.conf import settings
from django.test import Client

client = Client(HTTP_HOST="{HOST}")
answers = {{}}
for name, path, extra in [
    ("plain", "/login/", {{}}),
    ("https", "/login/", {{"secure": True}}),
    ("forwarded", "/login/", {{"HTTP_X_FORWARDED_PROTO": "https"}}),
    ("probe", "/healthz/live", {{}}),
]:
    response = client.get(path, **extra)
    answers[name] = {{
        "status": response.status_code,
        "location": response.get("Location", ""),
        "headers": dict(response.headers),
        "cookies": {{k: {{"secure": bool(m["secure"]), "httponly": bool(m["httponly"]),
                          "samesite": m["samesite"]}} for k, m in response.cookies.items()}},
    }}
answers["settings"] = {{
    name: getattr(settings, name, None)
    for name in ["SESSION_COOKIE_SECURE", "SESSION_COOKIE_HTTPONLY", "CSRF_COOKIE_SECURE",
                 "SECURE_PROXY_SSL_HEADER", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS"]
}}
print(json.dumps(answers))
"""


def probe(**overrides: str) -> dict:
    result = run(["-c", PROBE], production_env(**overrides))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_answers_with_https_only_headers_and_secure_cookies():
    answers = probe()

    assert answers["plain"]["status"] == 301
    assert answers["plain"]["location"] == f"https://{HOST}/login/"
    https = answers["https"]
    assert https["status"] == 200
    headers = https["headers"]
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert https["cookies"]["csrftoken"]["secure"]
    settings = answers["settings"]
    assert settings["SESSION_COOKIE_SECURE"] and settings["SESSION_COOKIE_HTTPONLY"]
    assert settings["CSRF_COOKIE_SECURE"]
    # No proxy header is trusted unless configured: a client could forge it.
    assert settings["SECURE_PROXY_SSL_HEADER"] is None
    assert answers["forwarded"]["status"] == 301
    # Probes inside the private network speak plain HTTP.
    assert answers["probe"]["status"] == 200


def test_behind_a_tls_terminating_proxy_its_header_counts_as_https():
    answers = probe(SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")

    assert answers["settings"]["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert answers["forwarded"]["status"] == 200
    assert "Strict-Transport-Security" in answers["forwarded"]["headers"]
    assert answers["plain"]["status"] == 301


def test_the_redirect_can_be_left_to_the_proxy():
    answers = probe(SECURE_SSL_REDIRECT="false")

    assert answers["settings"]["SECURE_SSL_REDIRECT"] is False
    assert answers["plain"]["status"] == 200
