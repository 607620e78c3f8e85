"""The environment variables allegro/settings.py reads, found in its source."""

import ast
from pathlib import Path

SETTINGS = Path(__file__).resolve().parents[2] / "allegro" / "settings.py"
_MISSING = object()


def settings_env_defaults() -> dict[str, object]:
    """Map every NAME of an `env("NAME", …)` or `env.<type>("NAME", …)` call to its default.

    The default is the literal value when it is a constant (`6`, `"INFO"`, `True`), and
    the sentinel `EXPRESSION` when it is computed (`not DEBUG`, `8 * 1024 * 1024`).
    """
    found: dict[str, object] = {}
    for node in ast.walk(ast.parse(SETTINGS.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        is_env = (isinstance(func, ast.Name) and func.id == "env") or (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "env"
        )
        first = node.args[0]
        if not (is_env and isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        value = default.value if isinstance(default, ast.Constant) else EXPRESSION
        if found.get(first.value, value) != value:
            value = EXPRESSION  # read twice with different defaults: nothing to compare
        found[first.value] = value
    return found


def settings_env_names() -> set[str]:
    """Return every NAME the settings read from the environment."""
    return set(settings_env_defaults())


class _Expression:
    def __repr__(self):
        return "EXPRESSION"


EXPRESSION = _Expression()
