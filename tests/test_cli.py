"""The command line as an operator meets it: one-line errors, masked secrets, a working `dev`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.dev import EmulatedXsuaa
from tests.conftest import ROUTES

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("VCAP_SERVICES", "PORT")}
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "proxy", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def vcap() -> dict[str, Any]:
    xsuaa = EmulatedXsuaa()
    xsuaa.base_url = "https://localhost:8443"
    return xsuaa.vcap_services("https://cpi.example.com")


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(ROUTES))
    return path


def test_check_prints_the_resolved_table_with_secrets_masked(
    vcap: dict[str, Any], routes_file: Path, tmp_path: Path
) -> None:
    env = {"VCAP_SERVICES": json.dumps(vcap), "CPI_PROXY_CONFIG": str(routes_file)}
    result = run(["check"], env, tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert "cpi: ^/cpi/(.*)$ -> /http/$1" in result.stdout
    assert "scope cpitexxsappname!t4711.texfrontendscope" in result.stdout
    assert "clientsecret ****" in result.stdout
    for entry in ("xsuaa", "it-rt"):
        creds = vcap[entry][0]["credentials"]
        secret = creds.get("clientsecret") or creds["oauth"]["clientsecret"]
        assert secret not in result.stdout


def test_check_reads_default_env_json(
    vcap: dict[str, Any], routes_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "default-env.json").write_text(
        json.dumps({"VCAP_SERVICES": vcap, "CPI_PROXY_CONFIG": str(routes_file)})
    )
    assert run(["check"], {}, tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "cpi-proxy: VCAP_SERVICES is not set"),
        ({"PORT": "eighty"}, "cpi-proxy: PORT='eighty' is not a whole number"),
        (
            {"CPI_PROXY_CONFIG": "/nonexistent/routes.json"},
            "cpi-proxy: CPI_PROXY_CONFIG: cannot read",
        ),
        ({"LOG_LEVEL": "LOUD"}, "cpi-proxy: LOG_LEVEL='LOUD' is not one of"),
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_bad_configuration_is_one_line_and_exit_2(
    command: str, env: dict[str, str], message: str, tmp_path: Path
) -> None:
    result = run(
        [command], {"CPI_PROXY_CONFIG": str(REPO / "config" / "routes.json"), **env}, tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_route_file_names_route_and_key(vcap: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "routes.json"
    bad.write_text(json.dumps({"routes": [{"source": "^/x$", "target": "/api/x"}]}))
    result = run(
        ["check"], {"VCAP_SERVICES": json.dumps(vcap), "CPI_PROXY_CONFIG": str(bad)}, tmp_path
    )
    assert result.returncode == 2
    assert "route 'route-1': target must be a string starting with /http/" in result.stderr


async def test_dev_prints_a_curl_that_goes_through_the_whole_path() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "dev",
        "--port",
        "0",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "VCAP_SERVICES"},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            line = b""
            while not line.startswith(b"curl "):
                line = await process.stdout.readline()
                assert line, "dev exited before printing the curl command"
        curl = line.decode()
        token = re.search(r"Authorization: Bearer ([\w.-]+)", curl)
        url = re.search(r"(http://\S+/cpi/cpitex)", curl)
        assert token and url
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url.group(1),
                data=b"Hello, iFlow",
                headers={"Authorization": f"Bearer {token.group(1)}"},
            ) as resp,
        ):
            assert (resp.status, await resp.read()) == (200, b"Hello, iFlow")
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
