"""Process settings from the environment, as frozen values.

`effective_environ` applies SAP's `default-env.json` convention (each top-level key acts as an
environment variable unless that variable is already set), so a developer can run locally with the
same file approuter and @sap/xssec read. `load` turns the environment into `Settings`, raising
`ConfigError` naming the variable when a value is unusable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import ConfigError

DEFAULT_ENV_FILE = "default-env.json"
MIN_HEAD_BYTES = 17 * 1024  # auth.MAX_TOKEN_BYTES and 1 KiB for the request line and Host


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"  # noqa: S104 - a CF app must listen on all interfaces
    port: int = 8080
    routes_file: Path = Path("config/routes.json")
    cache_size: int = 10_000  # CPI tokens and validated-claims entries, each
    exchange_timeout: float = 10.0
    token_margin: float = 60.0  # a cached CPI token is dropped this long before it expires
    keys_ttl: float = 900.0
    keys_min_refresh: float = 30.0  # at most one key fetch per this interval for unknown kids
    leeway: float = 60.0  # clock skew tolerated on exp/nbf
    connect_timeout: float = 10.0
    max_connections: int = 100
    replay_limit: int = 1024 * 1024  # bodies up to this (by Content-Length) can be re-sent
    replay_budget: int = 64 * 1024 * 1024  # all requests' held bodies together, at most
    reload_interval: float = 5.0  # seconds between route-file checks; 0: only on SIGHUP
    metrics_port: int = 0  # 0: /metrics on the main port
    shutdown_grace: float = 9.0  # Cloud Foundry sends SIGKILL 10 s after SIGTERM
    header_timeout: float = 10.0  # seconds a client has to send a request head (slowloris)
    body_timeout: float = 60.0  # the longest pause in a request body (nginx's client_body_timeout)
    max_clients: int = 1000  # client connections per process; more are answered 503
    # A request head's bytes (request line and header fields); more are answered 431. 64 KiB fits
    # the longest request line aiohttp admits (32 KiB), the largest token the validator accepts
    # (16 KiB) and the headers a router and a browser add, with room to spare.
    max_head_bytes: int = 64 * 1024
    debug: bool = False  # /_debug/tokens
    debug_scope: str | None = None  # required for /_debug/tokens when set ($XSAPPNAME expands)
    loop: str = "auto"  # auto: uvloop when installed
    workers: int = 1


def effective_environ(environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """`environ` overlaid on `cwd/default-env.json` when VCAP_SERVICES is not set."""
    merged = dict(environ)
    path = cwd / DEFAULT_ENV_FILE
    if "VCAP_SERVICES" in environ or not path.is_file():
        return merged
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a JSON object of environment variables")
    for key, value in data.items():
        merged.setdefault(str(key), value if isinstance(value, str) else json.dumps(value))
    return merged


def _number(
    environ: Mapping[str, str], key: str, default: float, *, integer: bool, zero: bool = False
) -> float:
    raw = environ.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"{key}={raw!r} is not {kind}") from None
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{key}={raw!r} must be greater than {'or equal to ' if zero else ''}0")
    return value


def load(environ: Mapping[str, str]) -> Settings:
    d = Settings()
    return Settings(
        host=d.host,
        port=_port(environ, "PORT", d.port),
        routes_file=Path(environ.get("CPI_PROXY_CONFIG") or d.routes_file),
        cache_size=int(_number(environ, "CPI_PROXY_CACHE_SIZE", d.cache_size, integer=True)),
        exchange_timeout=_number(
            environ, "CPI_PROXY_EXCHANGE_TIMEOUT", d.exchange_timeout, integer=False
        ),
        token_margin=_number(environ, "CPI_PROXY_TOKEN_MARGIN", d.token_margin, integer=False),
        keys_ttl=_number(environ, "CPI_PROXY_KEYS_TTL", d.keys_ttl, integer=False),
        keys_min_refresh=_number(
            environ, "CPI_PROXY_KEYS_MIN_REFRESH", d.keys_min_refresh, integer=False
        ),
        leeway=d.leeway,
        connect_timeout=_number(
            environ, "CPI_PROXY_CONNECT_TIMEOUT", d.connect_timeout, integer=False
        ),
        max_connections=int(
            _number(environ, "CPI_PROXY_MAX_CONNECTIONS", d.max_connections, integer=True)
        ),
        replay_limit=int(
            _number(environ, "CPI_PROXY_REPLAY_LIMIT", d.replay_limit, integer=True, zero=True)
        ),
        replay_budget=int(
            _number(environ, "CPI_PROXY_REPLAY_BUDGET", d.replay_budget, integer=True, zero=True)
        ),
        reload_interval=_number(
            environ, "CPI_PROXY_RELOAD_INTERVAL", d.reload_interval, integer=False, zero=True
        ),
        metrics_port=_port(environ, "CPI_PROXY_METRICS_PORT", d.metrics_port),
        shutdown_grace=_number(
            environ, "CPI_PROXY_SHUTDOWN_GRACE", d.shutdown_grace, integer=False, zero=True
        ),
        header_timeout=_number(
            environ, "CPI_PROXY_HEADER_TIMEOUT", d.header_timeout, integer=False
        ),
        body_timeout=_number(environ, "CPI_PROXY_BODY_TIMEOUT", d.body_timeout, integer=False),
        max_clients=int(_number(environ, "CPI_PROXY_MAX_CLIENTS", d.max_clients, integer=True)),
        max_head_bytes=_head_bytes(environ, "CPI_PROXY_MAX_HEAD_BYTES", d.max_head_bytes),
        debug=_flag(environ, "CPI_PROXY_DEBUG"),
        debug_scope=environ.get("CPI_PROXY_DEBUG_SCOPE") or None,
        loop=_choice(environ, "CPI_PROXY_LOOP", ("auto", "asyncio", "uvloop")),
        workers=int(_number(environ, "CPI_PROXY_WORKERS", d.workers, integer=True)),
    )


def _choice(environ: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str:
    value = environ.get(key, allowed[0]).strip().lower() or allowed[0]
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def _port(environ: Mapping[str, str], key: str, default: int) -> int:
    port = int(_number(environ, key, default, integer=True, zero=True))
    if port > 65535:
        raise ConfigError(f"{key}={port} is not a TCP port (1-65535)")
    return port


def _head_bytes(environ: Mapping[str, str], key: str, default: int) -> int:
    value = int(_number(environ, key, default, integer=True))
    if value < MIN_HEAD_BYTES:
        raise ConfigError(
            f"{key}={value} is below {MIN_HEAD_BYTES}: a 16 KiB token (the largest the proxy"
            " accepts) with its request line would be refused"
        )
    return value


def _flag(environ: Mapping[str, str], key: str) -> bool:
    raw = environ.get(key, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{key}={raw!r} is not a switch; use 1 or 0")
