"""`cpi-proxy doctor` against the emulators over real HTTPS: each check says what is wrong."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpServer

from proxy.bindings import JWT_BEARER, load_bindings
from proxy.cli import Config
from proxy.dev import DevCA, EmulatedXsuaa, OAuthClient, cpi_token_of
from proxy.doctor import main as doctor_main
from proxy.doctor import run_doctor
from proxy.routes import parse_routes
from proxy.settings import Settings
from tests.conftest import ROUTES, Iflow

CPITEX = {
    "name": "cpitex",
    "source": "^/cpitex$",
    "target": "/http/cpitex",
    "scope": "$XSAPPNAME.texfrontendscope",
    "cpiRole": "cpitex.Read",
}
DOCTOR_ROUTES: dict[str, Any] = {"routes": [*ROUTES["routes"], CPITEX]}
ROUTE_NAMES = [r["name"] for r in DOCTOR_ROUTES["routes"]]
MARK = 7  # "[FAIL] " and friends
REPO = Path(__file__).resolve().parent.parent


def make_config(services: dict[str, Any], routes: dict[str, Any] = DOCTOR_ROUTES) -> Config:
    bindings = load_bindings({"VCAP_SERVICES": json.dumps(services)})
    return Config(Settings(), bindings, parse_routes(routes).resolve(bindings.xsuaa.xsappname))


async def doctor(
    config: Config, token: str | None = None, clock: Callable[[], float] = time.time
) -> tuple[int, str]:
    out = io.StringIO()
    code = await run_doctor(config, token=token, out=out, clock=clock)
    return code, out.getvalue()


def line(output: str, check: str) -> str:
    """The one line of `check`, e.g. "[ok]   CPI runtime: ..."."""
    found = [x for x in output.splitlines() if x[MARK:].startswith(check + ": ")]
    assert len(found) == 1, output
    return found[0]


def status(output: str, check: str) -> str:
    return line(output, check)[:MARK].strip()


def fix(output: str, check: str) -> str:
    lines = output.splitlines()
    following = lines[lines.index(line(output, check)) + 1]
    assert following.startswith("       fix: "), output
    return following.removeprefix("       fix: ")


@pytest.fixture
def config(xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path) -> Config:
    return make_config(xsuaa.vcap_services(iflow.url))


@pytest.fixture
def admin(xsuaa: EmulatedXsuaa) -> str:
    """A role collection with the admin route's scope, so one user may call every route."""
    xsuaa.role_collections["Admin"] = frozenset({f"{xsuaa.frontend.xsappname}.admin"})
    return "Admin"


# --- without a user token --------------------------------------------------------------------


async def test_all_good_passes_every_check(config: Config, xsuaa: EmulatedXsuaa) -> None:
    code, output = await doctor(config)
    assert code == 0, output
    assert status(output, "XSUAA keys") == "[ok]"
    assert "1 key(s)" in line(output, "XSUAA keys")
    assert f"kid {xsuaa.signing_kid}" in line(output, "XSUAA keys")
    assert status(output, "Clock skew") == "[ok]"
    assert status(output, "CPI client credentials") == "[ok]"
    assert f"{xsuaa.cpi.xsappname}.cpitex.Read" in line(output, "CPI client credentials")
    assert status(output, "CPI runtime") == "[ok]"
    targets = {name: status(output, f"Route {name} target") for name in ROUTE_NAMES}
    assert targets == {
        "cpi": "[skip]",
        "technical": "[skip]",
        "read-only": "[skip]",
        "dots": "[skip]",
        "admin": "[ok]",
        "cpitex": "[ok]",
    }
    assert line(output, "Route cpi target") == (
        "[skip] Route cpi target: skipped: /http/$1 may reach any iFlow,"
        " so there is no single path to probe"
    )
    assert "/http/admin/ (static prefix of /http/admin/$1)" in line(output, "Route admin target")
    assert "User token" not in output
    assert output.splitlines()[-1] == "0 failed, 0 warning(s), 6 ok, 4 skipped"


async def test_target_probe_fetches_a_csrf_token_and_sends_no_message(
    config: Config, iflow: Iflow
) -> None:
    await doctor(config)
    probes = {r.raw_path: r for r in iflow.runtime.requests}
    assert set(probes) == {"/http/admin/", "/http/cpitex"}
    for probe in probes.values():
        assert (probe.method, probe.headers.get("X-CSRF-Token")) == ("GET", "Fetch")
        assert (probe.grant_type, probe.headers.get("Content-Length", "0")) == (
            "client_credentials",
            "0",
        )


async def test_wrong_cpi_client_secret_fails_with_a_fix(
    xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path
) -> None:
    services = xsuaa.vcap_services(iflow.url)
    services["it-rt"][0]["credentials"]["oauth"]["clientsecret"] = "not-the-secret"
    code, output = await doctor(make_config(services))
    assert code == 1
    assert line(output, "CPI client credentials").startswith(
        "[FAIL] CPI client credentials: XSUAA answered 401 invalid_client (Bad credentials)"
    )
    assert fix(output, "CPI client credentials") == (
        "re-create the binding or service key of 'cpitex-cpi' and use its clientsecret"
    )
    assert line(output, "Route cpitex target").endswith(
        "skipped: no token (see CPI client credentials)"
    )
    assert "not-the-secret" not in output


async def test_cpi_client_without_the_grant_is_told_to_add_it(
    config: Config, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.cpi = replace(xsuaa.cpi, grant_types=frozenset({JWT_BEARER}))
    code, output = await doctor(config)
    assert code == 1
    assert "unauthorized_client" in line(output, "CPI client credentials")
    assert fix(output, "CPI client credentials") == (
        'add "client_credentials" to "grant-types" in config-cpi.json and update \'cpitex-cpi\''
    )


async def test_failing_keys_endpoint_fails_but_the_clock_is_still_read(
    config: Config, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.keys_fault = "unavailable"
    code, output = await doctor(config)
    assert code == 1
    assert line(output, "XSUAA keys") == (
        f"[FAIL] XSUAA keys: cannot load keys from {config.bindings.xsuaa.jwks_url}:"
        " XSUAA answered 503; the proxy falls back to the binding's verificationkey"
    )
    assert "uaadomain" in fix(output, "XSUAA keys")
    assert status(output, "Clock skew") == "[ok]"  # the 503 carried a Date header too


async def test_untrusted_tls_certificate_points_at_ssl_cert_file(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    code, output = await doctor(config)
    assert code == 1
    assert ": its TLS certificate is not trusted;" in line(output, "XSUAA keys")
    tls_fix = (
        "the server's certificate is not trusted: for a private landscape, add its CA to"
        " SSL_CERT_FILE"
    )
    assert fix(output, "XSUAA keys") == tls_fix
    assert fix(output, "CPI client credentials") == tls_fix
    assert fix(output, "CPI runtime") == tls_fix
    assert status(output, "Clock skew") == "[skip]"


async def test_unreachable_runtime_fails_and_skips_the_targets(
    xsuaa: EmulatedXsuaa, ca_file: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    code, output = await doctor(make_config(xsuaa.vcap_services(f"https://127.0.0.1:{port}")))
    assert code == 1
    assert "cannot connect" in line(output, "CPI runtime")
    assert status(output, "CPI client credentials") == "[ok]"
    assert line(output, "Route cpitex target").endswith("skipped: the CPI runtime is unreachable")


@pytest.mark.parametrize(
    ("shift", "expected", "code"),
    [(30.0, "[warn]", 0), (-300.0, "[FAIL]", 1)],
)
async def test_clock_skew_beyond_five_seconds_warns_and_beyond_the_leeway_fails(
    config: Config, shift: float, expected: str, code: int
) -> None:
    result, output = await doctor(config, clock=lambda: time.time() + shift)
    assert (result, status(output, "Clock skew")) == (code, expected)
    found = re.search(r"XSUAA's clock is ([\d.]+) s (behind|ahead of) ours", output)
    assert found, output
    assert abs(float(found[1]) - abs(shift)) <= 1.5  # Date has whole seconds
    assert found[2] == ("behind" if shift > 0 else "ahead of")
    assert fix(output, "Clock skew") == "sync the clock of the host running cpi-proxy (NTP)"


# --- route targets, against a CPI with a few iFlows deployed ----------------------------------


@pytest.fixture
async def small_cpi(aiohttp_server: AiohttpServer, dev_ca: DevCA) -> str:
    """A CPI runtime with iFlows at fixed paths; as on CPI, any other /http/ path is 404."""
    deployed = {
        "/http/orders": 200,
        "/http/refused": 401,
        "/http/forbidden": 403,
        "/http/broken": 500,
    }

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=deployed.get(request.path, 404))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app, ssl=dev_ca.server_context())
    return f"https://localhost:{server.port}"


@pytest.mark.parametrize(
    ("target", "grant", "expected", "code"),
    [
        (
            "/http/orders",
            "jwt-bearer",
            "[ok]   Route r target: /http/orders answered 200: deployed",
            0,
        ),
        (
            "/http/nowhere",
            "jwt-bearer",
            "[FAIL] Route r target: /http/nowhere: no iFlow deployed at this path",
            1,
        ),
        (
            "/http/nowhere/$1",
            "jwt-bearer",
            "[warn] Route r target: /http/nowhere/ (static prefix of /http/nowhere/$1) answered"
            " 404: no iFlow there (expected if its address is longer)",
            0,
        ),
        (
            "/http/forbidden",
            "jwt-bearer",
            "[ok]   Route r target: /http/forbidden answered 403: deployed (the technical user"
            " lacks the iFlow's role, as expected for a jwt-bearer route)",
            0,
        ),
        (
            "/http/forbidden",
            "client-credentials",
            "[FAIL] Route r target: /http/forbidden answered 403: the it-rt client lacks"
            " the iFlow's role",
            1,
        ),
        (
            "/http/refused",
            "jwt-bearer",
            "[warn] Route r target: /http/refused answered 401: CPI refused the it-rt client's"
            " token",
            0,
        ),
        (
            "/http/broken",
            "jwt-bearer",
            "[warn] Route r target: /http/broken answered 500: the iFlow or CPI failed",
            0,
        ),
    ],
)
async def test_route_target_answers_are_interpreted(
    xsuaa: EmulatedXsuaa,
    small_cpi: str,
    ca_file: Path,
    target: str,
    grant: str,
    expected: str,
    code: int,
) -> None:
    route = {"name": "r", "source": "^/r/(.*)$", "target": target, "grant": grant}
    config = make_config(xsuaa.vcap_services(small_cpi), {"routes": [route]})
    result, output = await doctor(config)
    assert (result, line(output, "Route r target")) == (code, expected)
    if "no iFlow deployed" in expected:
        assert "HTTPS sender adapter" in fix(output, "Route r target")


async def test_technical_route_whose_cpi_role_the_client_lacks_fails(
    xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path
) -> None:
    route = {
        "name": "t",
        "source": "^/t$",
        "target": "/http/cpitex",
        "grant": "client-credentials",
        "cpiRole": "cpitex.Write",
    }
    config = make_config(xsuaa.vcap_services(iflow.url), {"routes": [route]})
    code, output = await doctor(config)
    assert (code, line(output, "Route t target")) == (
        1,
        "[FAIL] Route t target: /http/cpitex answered 200: the it-rt client lacks role"
        " cpitex.Write",
    )
    assert fix(output, "Route t target") == (
        "add role cpitex.Write to roles in config-cpi.json and update the it-rt service"
    )


# --- with a user token -----------------------------------------------------------------------


async def test_user_with_the_role_collections_may_call_every_route(
    config: Config, xsuaa: EmulatedXsuaa, admin: str
) -> None:
    token = xsuaa.mint_user_token("alice", role_collections=("CpiTexUser", admin))
    code, output = await doctor(config, token)
    assert code == 0, output
    assert line(output, "User token").startswith(
        f"[ok]   User token: user alice (origin sap.default), zone {xsuaa.zone_id},"
        " expires in 60 min; scopes "
    )
    assert {status(output, f"Route {n} access") for n in ROUTE_NAMES} == {"[ok]"}
    assert line(output, "Route read-only access").endswith("any valid user token suffices")
    assert line(output, "CPI token exchange") == (
        "[ok]   CPI token exchange: jwt-bearer gave a CPI token;"
        f" CPI scopes {xsuaa.cpi.xsappname}.cpitex.Read"
    )
    assert line(output, "Route cpitex CPI role") == (
        "[ok]   Route cpitex CPI role: the user holds cpitex.Read"
    )
    assert line(output, "Route cpi CPI role") == (
        "[info] Route cpi CPI role: no cpiRole set; the user holds CPI roles: cpitex.Read"
    )
    assert "Route technical CPI role" not in output  # client-credentials: not the user's roles


async def test_user_without_the_cpi_role_is_told_which_role_and_where(
    config: Config, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",))
    code, output = await doctor(config, token)
    assert code == 1
    assert status(output, "Route cpitex access") == "[ok]"
    assert line(output, "Route cpitex CPI role") == (
        "[FAIL] Route cpitex CPI role: user lacks CPI role cpitex.Read"
    )
    assert fix(output, "Route cpitex CPI role") == (
        "add cpitex.Read to a role collection assigned to the user"
        " (role changes take effect at CPI within an hour)"
    )
    assert line(output, "Route admin access").endswith(
        f"needs scope {xsuaa.frontend.xsappname}.admin"
    )
    assert "role collection" in fix(output, "Route admin access")


async def test_user_without_uaa_user_gets_the_exchange_hint(
    config: Config, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token("carol", role_collections=("NoUaaUser",))
    code, output = await doctor(config, token)
    assert code == 1
    assert status(output, "CPI token exchange") == "[FAIL]"
    assert "uaa.user" in fix(output, "CPI token exchange")
    assert line(output, "Route cpitex CPI role").endswith("skipped: no CPI token for this user")


OTHER_APP = OAuthClient("sb-other!t9", "irrelevant", "other!t9", frozenset())


@pytest.mark.parametrize(
    ("mint", "reason"),
    [
        ({"expires_in": -3600}, "the token has expired; get a fresh one from XSUAA"),
        ({"client": OTHER_APP}, "the token's audience does not include this app"),
    ],
)
async def test_invalid_user_token_gives_the_reason_and_skips_the_rest(
    config: Config, xsuaa: EmulatedXsuaa, mint: dict[str, Any], reason: str
) -> None:
    code, output = await doctor(config, xsuaa.mint_user_token(**mint))
    assert code == 1
    assert line(output, "User token").startswith(f"[FAIL] User token: {reason}")
    assert "the app's own XSUAA instance 'cpitex-xsuaa'" in fix(output, "User token")
    assert line(output, "CPI token exchange").endswith("skipped: the user token is not valid")
    assert line(output, "Route cpitex access").endswith("skipped: the user token is not valid")


async def test_output_never_holds_a_token_secret_key_or_cookie(
    config: Config, xsuaa: EmulatedXsuaa, iflow: Iflow, admin: str
) -> None:
    iflow.runtime.csrf_protected = True  # probes get CSRF tokens and session cookies back
    token = xsuaa.mint_user_token("alice", role_collections=("CpiTexUser", admin))
    code, output = await doctor(config, token)
    assert code == 0, output
    probes = iflow.runtime.requests
    assert probes and all(r.csrf == "fetch" for r in probes)
    verificationkey = config.bindings.xsuaa.verificationkey
    assert verificationkey is not None
    secrets = [
        token,
        *token.split("."),
        *(cpi_token_of(r) for r in probes),
        xsuaa.cpi.client_secret,
        xsuaa.frontend.client_secret,
        verificationkey.splitlines()[1],
    ]
    assert [s for s in secrets if s in output] == []
    for marker in ("eyJ", "JSESSIONID", "__VCAP_ID__", "Bearer", "BEGIN"):
        assert marker not in output


# --- the command line ------------------------------------------------------------------------


async def test_cli_reads_the_token_from_stdin_and_exits_0(
    xsuaa: EmulatedXsuaa, iflow: Iflow, ca_file: Path, tmp_path: Path, admin: str
) -> None:
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps(DOCTOR_ROUTES))
    env = {
        **os.environ,
        "VCAP_SERVICES": json.dumps(xsuaa.vcap_services(iflow.url)),
        "CPI_PROXY_CONFIG": str(routes_file),
        "SSL_CERT_FILE": str(ca_file),
    }
    token = xsuaa.mint_user_token("alice", role_collections=("CpiTexUser", admin))
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "doctor", "--token", "-"),
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate(token.encode() + b"\n")
    output = stdout.decode()
    assert (process.returncode, stderr.decode()) == (0, ""), output
    assert line(output, "User token").startswith("[ok]   User token: user alice")
    assert token not in output
    marks = ("cpi-proxy doctor:", "[ok]", "[warn]", "[FAIL]", "[skip]", "[info]", "       fix:")
    assert [x for x in output.splitlines()[:-1] if not x.startswith(marks)] == []  # no log lines


async def test_cli_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "doctor"),
        cwd=tmp_path,
        env={**os.environ, "CPI_PROXY_CONFIG": str(REPO / "config" / "routes.json")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert stderr.decode().startswith("cpi-proxy: VCAP_SERVICES is not set")
    assert stderr.decode().count("\n") == 1


def test_empty_token_on_stdin_is_refused_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    xsuaa = EmulatedXsuaa()
    config = make_config(xsuaa.vcap_services("https://cpi.example.com"))
    assert doctor_main(config, "-", stdin=io.StringIO("\n")) == 2
    assert capsys.readouterr().err == "cpi-proxy: --token: no token given (nothing on stdin?)\n"
