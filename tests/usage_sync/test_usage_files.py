"""Reading usage files: a JSON line reads exactly as json.loads reads it."""

import io
import json
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from usage_sync.usage_files import BadLine, UsageFile

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
SPACE = st.sampled_from(["", " ", "\t", "\r\n", "\n", "\x0c", "\u00a0", "\ufeff"])


@st.composite
def lines(draw) -> bytes:
    if draw(st.booleans()):
        text = draw(SPACE) + json.dumps(draw(JSON_VALUES), ensure_ascii=draw(st.booleans()))
        text += draw(SPACE) + draw(st.sampled_from(["", "x", "}", " 1", "\x00"]))
        encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))
        return text.encode(encoding, "surrogatepass")
    return draw(st.sampled_from([
        b'{"a": NaN, "b": -Infinity, "c": 1e400}\n', b'{"a": "\\ud800"}\n', b'{"a": 1, "a": 2}',
        b'{"a": "\xed\xa0\x80"}\n', b'{"a": 1.0E+2}\r\n', b"[1, 2] [3]\n", b'"\\q"', b"\xff\n",
    ])) + draw(st.binary(max_size=3))


def read_as_json_loads(raw: bytes):
    if not raw.strip():
        return None
    try:
        return repr(json.loads(raw, parse_float=Decimal))
    except ValueError as exc:
        return f"Not valid JSON: {exc}"


def read_as_the_file_does(raw: bytes):
    read = list(UsageFile(io.BytesIO(raw), format="jsonl").lines())
    if not read:
        return None
    [(_, event)] = read
    return event.error if isinstance(event, BadLine) else repr(event)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(lines())
def test_a_json_line_reads_as_json_loads_reads_it(raw):
    # A line of the file holds no newline but its last character.
    raw = raw.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n"

    assert read_as_the_file_does(raw) == read_as_json_loads(raw)
