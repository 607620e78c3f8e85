"""The README's configuration table lists every variable the settings read, with its
default, so the table cannot drift from allegro/settings.py."""

import re
from pathlib import Path

import pytest

from tests.ops.settings_env import EXPRESSION, settings_env_defaults

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def configuration_table() -> dict[str, str]:
    """Map each variable of the README's Configuration table to its default cell."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return {
        name: default.strip()
        for name, default in re.findall(r"^\| `([A-Z_0-9]+)` \|([^|]*)\|", section, re.M)
    }


def expected_text(default) -> str | None:
    """How the README writes a literal default."""
    if default is EXPRESSION or default is None:
        return None
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float):
        return f"`{default:g}`"
    if default == "":
        return "empty"
    return f"`{default}`"


def test_the_settings_read_a_sizeable_number_of_variables():
    # Guards the parser: if it found nothing, the test below would pass vacuously.
    names = settings_env_defaults()
    assert {"DATABASE_URL", "ARIA_AUTH_KEY", "KAFKA_CONSUMER_GROUP"} <= names.keys()
    assert names["KAFKA_AGGREGATED_TOPIC_PARTITIONS"] == 6
    assert names["DEBUG"] is True


@pytest.mark.parametrize("name", sorted(settings_env_defaults()))
def test_every_variable_the_settings_read_is_in_the_configuration_table(name):
    table = configuration_table()
    assert name in table, f"README's configuration table lacks {name}"
    assert table[name], f"README gives no default for {name}"


# A computed default (an expression) is described in words; the test above checks the
# table says something for it.
LITERAL_DEFAULTS = sorted(
    name for name, default in settings_env_defaults().items()
    if expected_text(default) is not None
)


@pytest.mark.parametrize("name", LITERAL_DEFAULTS)
def test_the_table_states_the_literal_defaults_of_the_settings(name):
    expected = expected_text(settings_env_defaults()[name])
    assert expected in configuration_table().get(name, ""), (name, expected)


def test_the_table_lists_no_variable_twice():
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([A-Z_0-9]+)` \|", section, re.M)
    assert len(names) == len(set(names))
