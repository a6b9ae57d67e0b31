"""Path normalisation decides what a request means; every escape must be caught here."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.paths import normalise, split_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/cpi/cpitex", "/cpi/cpitex"),
        ("/cpi/a/./b", "/cpi/a/b"),
        ("/cpi/a/../b", "/cpi/b"),
        ("/cpi/a/%2e%2e/b", "/cpi/b"),
        ("/cpi/a/%2E%2E/b", "/cpi/b"),
        ("/cpi/a/.%2e/b", "/cpi/b"),
        ("/cpi/a%2fb", "/cpi/a/b"),
        ("/cpi/a%2F..%2Fb", "/cpi/b"),
        ("/cpi/a/..;x/b", "/cpi/b"),
        ("/cpi/a/b/", "/cpi/a/b/"),
        ("/cpi/a/b/..", "/cpi/a/"),
        ("/cpi/%41%20b", "/cpi/%41%20b"),  # other escapes stay byte-exact
        ("/cpi/%252e%252e/x", "/cpi/%252e%252e/x"),  # double encoding is data, not a dot
        ("/", "/"),
    ],
)
def test_normalise_resolves_dots_and_encoded_separators(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/..", "climbs above the root"),
        ("/cpi/../../etc", "climbs above the root"),
        ("/%2e%2e/http", "climbs above the root"),
        ("/cpi/%2e%2e%2f%2e%2e%2fx", "climbs above the root"),
        ("/cpi/a%5cb", "encoded backslash"),
        ("/cpi/a%00b", "encoded NUL"),
        ("/cpi/a\\b", "backslash"),
        ("/cpi/a b", "control, non-ASCII"),
        ("/cpi/\u00e9", "non-ASCII"),
        ("/cpi/%zz", "malformed percent-escape"),
        ("/cpi/%c0%ae%c0%ae/x", "UTF-8"),  # overlong-encoded dots
        ("cpi/x", "must start with /"),
        ("http://evil.example/x", "must start with /"),
    ],
)
def test_normalise_rejects_ambiguous_paths(raw: str, reason: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalise(raw)
    assert reason in info.value.description


def test_split_target_keeps_query_byte_exact() -> None:
    assert split_target("/cpi/x?a=%2F&b=1&a=2;c") == ("/cpi/x", "a=%2F&b=1&a=2;c")
    assert split_target("/cpi/x") == ("/cpi/x", "")
    assert split_target("/cpi/x?") == ("/cpi/x", "")
