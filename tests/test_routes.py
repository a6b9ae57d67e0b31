"""The route table: parsing is strict, matching is first-match with 405 for wrong methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ConfigError, MethodNotAllowed, NotFound
from proxy.routes import load_routes, parse_routes

SEED = {
    "routes": [
        {
            "source": "^/cpi/(.*)$",
            "target": "/http/$1",
            "scope": "$XSAPPNAME.texfrontendscope",
            "methods": ["GET", "POST"],
            "grant": "jwt-bearer",
            "timeout": 60,
        }
    ]
}


def route(**overrides: Any) -> dict[str, Any]:
    return {**SEED["routes"][0], **overrides}


def test_seed_route_maps_to_http_and_expands_xsappname() -> None:
    table = parse_routes(SEED).resolve("cpitexxsappname!t1")
    matched, target = table.match("/cpi/orders/42", "POST")
    assert (matched.name, target) == ("route-1", "/http/orders/42")
    assert matched.scopes == ("cpitexxsappname!t1.texfrontendscope",)
    assert (matched.grant, matched.timeout) == ("jwt-bearer", 60.0)


def test_shipped_route_file_is_valid() -> None:
    table = load_routes(Path(__file__).parent.parent / "config" / "routes.json").resolve("app!t1")
    assert table.match("/cpi/cpitex", "POST")[1] == "/http/cpitex"


def test_first_matching_route_wins_and_groups_substitute() -> None:
    table = parse_routes(
        {
            "routes": [
                route(
                    name="orders", source="^/cpi/orders/([0-9]+)/(\\w+)$", target="/http/o/$2/$1"
                ),
                route(name="rest", source="^/cpi/(.*)$", target="/http/any/$1"),
            ]
        }
    )
    assert table.match("/cpi/orders/7/lines", "GET")[1] == "/http/o/lines/7"
    assert table.match("/cpi/orders/x/lines", "GET")[1] == "/http/any/orders/x/lines"


def test_scope_may_be_a_list_and_methods_are_optional() -> None:
    table = parse_routes(
        {"routes": [{k: v for k, v in route(scope=["a.x", "b.y"]).items() if k != "methods"}]}
    )
    matched, _ = table.match("/cpi/x", "DELETE")
    assert matched.scopes == ("a.x", "b.y")
    assert matched.methods is None


def test_no_route_is_404() -> None:
    with pytest.raises(NotFound):
        parse_routes(SEED).match("/other/x", "GET")


def test_wrong_method_is_405_with_allow() -> None:
    with pytest.raises(MethodNotAllowed) as info:
        parse_routes(SEED).match("/cpi/x", "DELETE")
    assert info.value.headers["Allow"] == "GET, POST"


def test_method_mismatch_falls_through_to_a_later_route() -> None:
    table = parse_routes(
        {"routes": [route(name="read", methods=["GET"]), route(name="write", methods=["POST"])]}
    )
    assert table.match("/cpi/x", "POST")[0].name == "write"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"routes": []}, "routes must be a non-empty list"),
        ({"routes": [route()], "extra": 1}, "unknown key(s) extra"),
        ({"routes": [route(sorce="x")]}, "unknown key(s) sorce"),
        ({"routes": [route(source="^/cpi/(.*$")]}, "is not a valid regex"),
        ({"routes": [route(target="/api/$1")]}, "target must be a string starting with /http/"),
        ({"routes": [route(target="/http/$2")]}, "target uses $2 but source has 1 group"),
        ({"routes": [route(target="/http/../$1")]}, "must not hold dot segments or escapes"),
        ({"routes": [route(target="/http/%2e%2e/$1")]}, "must not hold dot segments or escapes"),
        ({"routes": [route(scope=5)]}, "scope must be a string or a list"),
        ({"routes": [route(methods=["FETCH"])]}, "methods must be a non-empty list"),
        ({"routes": [route(grant="password")]}, "grant must be one of"),
        ({"routes": [route(timeout=0)]}, "timeout must be a positive number"),
        ({"routes": [route(timeout=True)]}, "timeout must be a positive number"),
        ({"routes": [route(name="a"), route(name="a")]}, "route name 'a' is used twice"),
        ({"routes": [route()], "xsuaa": "x"}, '"xsuaa" must be {"service"'),
    ],
)
def test_bad_route_files_name_the_problem(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes(data)
    assert message in str(info.value)


def test_service_names_are_read(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(
        json.dumps({**SEED, "xsuaa": {"service": "my-uaa"}, "cpi": {"service": "my-cpi"}})
    )
    table = load_routes(path)
    assert (table.xsuaa_service, table.cpi_service) == ("my-uaa", "my-cpi")


def test_missing_or_broken_route_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CPI_PROXY_CONFIG: cannot read route file"):
        load_routes(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_routes(broken)
