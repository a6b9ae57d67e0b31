"""The route table, modelled on approuter's xs-app.json. Pure: no aiohttp, no I/O but the read.

    {"xsuaa": {"service": "my-xsuaa"}, "cpi": {"service": "my-cpi"},
     "routes": [{"source": "^/cpi/(.*)$", "target": "/http/$1",
                 "scope": "$XSAPPNAME.texfrontendscope", "methods": ["GET", "POST"],
                 "grant": "jwt-bearer", "timeout": 60}]}

Everything is checked at load time, so a bad file stops the process with a message naming the
route and key instead of failing on the first request.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from proxy.errors import BadRequest, ConfigError, MethodNotAllowed, NotFound
from proxy.paths import normalise, split_target

Grant = Literal["jwt-bearer", "client-credentials"]
GRANTS: tuple[Grant, ...] = ("jwt-bearer", "client-credentials")
Csrf = Literal["auto", True, False]
Authentication = Literal["xsuaa", "none"]
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TARGET_PREFIX = "/http/"
_ROUTE_KEYS = frozenset(
    {
        "name",
        "description",
        "source",
        "target",
        "scope",
        "methods",
        "grant",
        "timeout",
        "csrf",
        "authenticationType",
        "cpiRole",
    }
)
_TOP_KEYS = frozenset({"routes", "xsuaa", "cpi"})
_GROUP_REF = re.compile(r"\$(\d+)")


@dataclass(frozen=True)
class Route:
    name: str
    source: re.Pattern[str]
    target: str  # template with $1..$n
    scopes: tuple[str, ...]  # any one suffices; empty: any valid user token
    methods: frozenset[str] | None  # None: every method
    grant: Grant = "jwt-bearer"
    timeout: float = 60.0
    csrf: Csrf = "auto"
    authentication: Authentication = "xsuaa"
    cpi_role: str | None = None  # e.g. "cpitex.Read": checked in the CPI token before calling

    def target_for(self, match: re.Match[str]) -> str:
        return "".join(
            part if isinstance(part, str) else match.group(part) or "" for part in self._template
        )

    @cached_property
    def _template(self) -> tuple[str | int, ...]:
        """The target split once into literals and group numbers: "/http/$1" -> ("/http/", 1)."""
        parts = _GROUP_REF.split(self.target)
        return tuple(p if i % 2 == 0 else int(p) for i, p in enumerate(parts) if p)


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...]
    xsuaa_service: str | None = None
    cpi_service: str | None = None

    def match(self, path: str, method: str) -> tuple[Route, str]:
        """First route whose source matches and which allows `method` -> (route, target path)."""
        allowed: set[str] = set()
        for route in self.routes:
            found = route.source.match(path)
            if found is None:
                continue
            if route.methods is None or method in route.methods:
                return route, route.target_for(found)
            allowed |= route.methods
        if allowed:
            raise MethodNotAllowed(
                f"{method} is not allowed on this path; allowed: {', '.join(sorted(allowed))}",
                allowed=frozenset(allowed),
            )
        raise NotFound("no route matches this path; see the route file (CPI_PROXY_CONFIG)")

    def resolve(self, xsappname: str) -> RouteTable:
        """Expand $XSAPPNAME in scopes with the XSUAA binding's xsappname."""
        routes = tuple(
            replace(r, scopes=tuple(s.replace("$XSAPPNAME", xsappname) for s in r.scopes))
            for r in self.routes
        )
        return RouteTable(routes, self.xsuaa_service, self.cpi_service)


def map_request(table: RouteTable, raw_target: str, method: str) -> tuple[Route, str, str]:
    """A request-target as CPI will see it: (route, path under /http/, byte-exact query).

    The path is normalised before routing; a group that carries a dot segment into the target
    could climb out of the route's prefix, so such a mapping is refused, never resolved.
    """
    raw_path, query = split_target(raw_target)
    route, target = table.match(normalise(raw_path), method)
    if normalise(target) != target or not target.startswith(TARGET_PREFIX):
        raise BadRequest(
            f"the mapped path holds dot segments or leaves {TARGET_PREFIX}; nothing was sent to CPI"
        )
    return route, target, query


def _service_name(data: Mapping[str, Any], key: str, where: str) -> str | None:
    section = data.get(key)
    if section is None:
        return None
    if (
        not isinstance(section, dict)
        or set(section) != {"service"}
        or not isinstance(section["service"], str)
    ):
        raise ConfigError(f'{where}: "{key}" must be {{"service": "<bound service name>"}}')
    return section["service"]


def _parse_route(raw: Any, index: int, where: str) -> Route:
    at = f"{where} route {index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: must be an object")
    unknown = set(raw) - _ROUTE_KEYS
    if unknown:
        raise ConfigError(
            f"{at}: unknown key(s) {', '.join(sorted(unknown))};"
            f" allowed: {', '.join(sorted(_ROUTE_KEYS))}"
        )
    name = raw.get("name", f"route-{index + 1}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{at}: name must be a non-empty string")
    at = f"{where} route {name!r}"
    source_text = raw.get("source")
    if not isinstance(source_text, str) or not source_text:
        raise ConfigError(f"{at}: source (a regex on the request path) is required")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # re's FutureWarnings flag patterns that may change
            source = re.compile(source_text)
    except (re.error, FutureWarning) as exc:
        raise ConfigError(f"{at}: source {source_text!r} is not a valid regex ({exc})") from None
    target = raw.get("target")
    if not isinstance(target, str) or not target.startswith(TARGET_PREFIX):
        raise ConfigError(f"{at}: target must be a string starting with {TARGET_PREFIX}")
    for ref in _GROUP_REF.findall(target):
        if int(ref) > source.groups:
            raise ConfigError(f"{at}: target uses ${ref} but source has {source.groups} group(s)")
    literal = _GROUP_REF.sub("x", target)
    try:
        plain = normalise(literal) == literal
    except BadRequest:
        plain = False
    if not plain:
        raise ConfigError(f"{at}: target {target!r} must not hold dot segments or escapes")
    scope = raw.get("scope", [])
    scopes = [scope] if isinstance(scope, str) else scope
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise ConfigError(f"{at}: scope must be a string or a list of strings")
    methods = raw.get("methods")
    if methods is not None:
        if (
            not isinstance(methods, list)
            or not methods
            or not all(isinstance(m, str) and m.upper() in HTTP_METHODS for m in methods)
        ):
            raise ConfigError(
                f"{at}: methods must be a non-empty list of {', '.join(sorted(HTTP_METHODS))}"
            )
        methods = frozenset(m.upper() for m in methods)
    grant = raw.get("grant", "jwt-bearer")
    if grant not in GRANTS:
        raise ConfigError(f"{at}: grant must be one of {', '.join(GRANTS)}")
    timeout = raw.get("timeout", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{at}: timeout must be a positive number of seconds")
    csrf = raw.get("csrf", "auto")
    if csrf not in ("auto", True, False):
        raise ConfigError(f'{at}: csrf must be "auto", true or false')
    authentication = raw.get("authenticationType", "xsuaa")
    if authentication not in ("xsuaa", "none"):
        raise ConfigError(f'{at}: authenticationType must be "xsuaa" or "none"')
    if authentication == "none" and (grant != "client-credentials" or scopes):
        raise ConfigError(
            f'{at}: authenticationType "none" needs grant "client-credentials" and no scope'
            " (without a user token there is no user to exchange or scope to check)"
        )
    cpi_role = raw.get("cpiRole")
    if cpi_role is not None and (not isinstance(cpi_role, str) or not cpi_role.strip()):
        raise ConfigError(f'{at}: cpiRole must be the iFlow\'s role name, e.g. "cpitex.Read"')
    return Route(
        name,
        source,
        target,
        tuple(scopes),
        methods,
        grant,
        float(timeout),
        csrf,
        authentication,
        cpi_role,
    )


def parse_routes(data: Any, *, where: str = "route file") -> RouteTable:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object with a routes list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    routes = data.get("routes")
    if not isinstance(routes, list) or not routes:
        raise ConfigError(f"{where}: routes must be a non-empty list")
    parsed = tuple(_parse_route(r, i, where) for i, r in enumerate(routes))
    names = [r.name for r in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{where}: route name {duplicate!r} is used twice")
    return RouteTable(
        parsed, _service_name(data, "xsuaa", where), _service_name(data, "cpi", where)
    )


def load_routes(path: Path) -> RouteTable:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"CPI_PROXY_CONFIG: cannot read route file {str(path)!r} ({exc.strerror})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_routes(data, where=str(path))
