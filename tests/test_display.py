"""The display helpers every view formats through: exact outputs, so all views keep reading alike."""

from __future__ import annotations

import pytest

from closewait.display import (
    format_address,
    format_bytes,
    format_command,
    format_decimal,
    format_duration,
    format_latency,
    format_ms,
    plural,
)
from closewait.model import Endpoint


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0 ms"),
        (999, "999 ms"),
        (1000, "1.0 s"),
        (1500, "1.5 s"),
        (59_949, "59.9 s"),
        (61000, "1 min"),
        (3_599_000, "60 min"),
        (7200000, "2.0 h"),
        (2 * 86400000, "2.0 d"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text


@pytest.mark.parametrize(
    ("ms", "text"), [(0.0, "0.0 ms"), (3.44, "3.4 ms"), (999.9, "999.9 ms"), (1000.0, "1.0 s"), (61_250.0, "61.2 s")]
)
def test_format_latency(ms: float, text: str) -> None:
    assert format_latency(ms) == text


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (250, "250ms"),
        (1000, "1s"),
        (1500, "1500ms"),
        (90_000, "90s"),
        (300_000, "5m"),
        (5_400_000, "90m"),
        (7_200_000, "2h"),
    ],
)
def test_format_ms_gives_back_what_was_typed(ms: int, text: str) -> None:
    assert format_ms(ms) == text


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 8080, "127.0.0.1:8080"),
        ("::1", 9, "[::1]:9"),
        ("::ffff:10.0.0.1", 443, "[::ffff:10.0.0.1]:443"),
        ("localhost", 0, "localhost:0"),
    ],
)
def test_format_address_and_endpoint_share_one_rule(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text
    assert str(Endpoint(host, port)) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024, "1.0 MiB"),
        (3_500_000, "3.3 MiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("value", "text"), [(0.0, "0"), (2.0, "2"), (0.25, "0.25"), (1.23456, "1.235"), (12.5, "12.5"), (-1.5, "-1.5")]
)
def test_format_decimal(value: float, text: str) -> None:
    assert format_decimal(value) == text


def test_format_command() -> None:
    assert format_command(["python3", "-m", "http.server"], "python3", 80) == "python3 -m http.server"
    assert format_command(["sh", "-c", "echo a b"], "sh", 80) == "sh -c 'echo a b'"
    assert format_command([], "kworker/0:1", 80) == "[kworker/0:1]"
    # One line whatever the arguments hold.
    assert format_command(["python3", "-c", "import x\nx.run()\t"], "python3", 80) == "python3 -c 'import x\\nx.run() '"
    long = format_command(["prog", "a" * 200], "prog", 20)
    assert long == "prog aaaaaaaaaaaa..."
    assert len(long) == 20
    assert format_command(["a" * 20], "a", 20) == "a" * 20


@pytest.mark.parametrize(
    ("n", "word", "text"),
    [
        (0, "socket", "0 sockets"),
        (1, "socket", "1 socket"),
        (2, "CLOSE_WAIT socket", "2 CLOSE_WAIT sockets"),
        (1, "process", "1 process"),
        (3, "process", "3 processes"),
        (2, "byte", "2 bytes"),
    ],
)
def test_plural(n: int, word: str, text: str) -> None:
    assert plural(n, word) == text
