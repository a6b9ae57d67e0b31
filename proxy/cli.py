"""`cpi-proxy serve | check | dev`: configuration errors end the process with one line, exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from proxy import __version__, logs
from proxy.bindings import Bindings, load_bindings
from proxy.errors import ConfigError
from proxy.routes import RouteTable, load_routes
from proxy.serve import serve
from proxy.settings import Settings, effective_environ, load


@dataclass(frozen=True)
class Config:
    settings: Settings
    bindings: Bindings
    routes: RouteTable


def load_config(environ: Mapping[str, str]) -> Config:
    settings = load(environ)
    routes = load_routes(settings.routes_file)
    bindings = load_bindings(
        environ, xsuaa_service=routes.xsuaa_service, cpi_service=routes.cpi_service
    )
    return Config(settings, bindings, routes.resolve(bindings.xsuaa.xsappname))


def describe(config: Config) -> str:
    """The resolved configuration for humans; secrets are masked."""
    x, c = config.bindings.xsuaa, config.bindings.cpi
    auth = "x509 certificate (mTLS)" if c.x509 else "clientsecret ****"
    lines = [
        f"XSUAA  service {x.name!r}: clientid {x.clientid}, xsappname {x.xsappname},"
        f" zone {x.zone_id}, keys {x.jwks_url}"
        + (", verificationkey present" if x.verificationkey else ""),
        f"CPI    service {c.name!r}: clientid {c.clientid}, {auth},"
        f" tokenurl {c.tokenurl}, runtime {c.url}",
        f"routes from {config.settings.routes_file} (first match wins):",
    ]
    for r in config.routes.routes:
        methods = ", ".join(sorted(r.methods)) if r.methods else "all methods"
        scopes = " or ".join(r.scopes) if r.scopes else "(any valid user token)"
        if r.authentication == "none":
            scopes = "(public: authenticationType none)"
        lines.append(
            f"  {r.name}: {r.source.pattern} -> {r.target}  [{methods}]  scope {scopes}"
            f"  grant {r.grant}  csrf {str(r.csrf).lower()}  timeout {r.timeout:g}s"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpi-proxy", description="Call SAP CPI iFlows with the caller's XSUAA identity."
    )
    parser.add_argument("--version", action="version", version=f"cpi-proxy {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the proxy (the default)")
    serve.add_argument("--host", help="listen address (default 0.0.0.0)")
    serve.add_argument(
        "--workers",
        type=int,
        choices=range(1, 65),
        metavar="N",
        help="processes sharing the port via SO_REUSEPORT (default $CPI_PROXY_WORKERS or 1)",
    )
    sub.add_parser("check", help="validate bindings and routes, print them, exit")
    doctor = sub.add_parser(
        "doctor", help="check XSUAA, CPI and each route live; print a checklist, exit 0 or 1"
    )
    doctor.add_argument(
        "--token", metavar="JWT", help="also check this user token ('-': read it from stdin)"
    )
    dev = sub.add_parser("dev", help="run with an emulated XSUAA and iFlow runtime on loopback")
    dev.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    dev.add_argument("--port", type=int, help="proxy port (default $PORT or 8080; 0: any free)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    try:
        environ = effective_environ(os.environ, Path.cwd())
        logs.configure(environ)
        if command == "dev":
            from proxy.dev.run import run_dev

            settings = load(environ)
            port = settings.port if args.port is None else args.port
            return run_dev(replace(settings, host=args.host, port=port))
        config = load_config(environ)
    except ConfigError as exc:
        print(f"cpi-proxy: {exc}", file=sys.stderr)
        return 2
    if command == "check":
        print(describe(config))
        return 0
    if command == "doctor":
        from proxy.doctor import main as doctor_main

        return doctor_main(config, args.token)
    settings = replace(
        config.settings,
        host=args.host or config.settings.host,
        workers=args.workers or config.settings.workers,
    )
    try:
        return serve(settings, config.bindings, config.routes)
    except ConfigError as exc:
        print(f"cpi-proxy: {exc}", file=sys.stderr)
        return 2
