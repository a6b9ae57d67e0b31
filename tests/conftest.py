"""Shared fixtures. Every test starts from a clean environment (httpx's habit)."""

from __future__ import annotations

import os

import pytest

_OURS = ("VCAP_SERVICES", "VCAP_APPLICATION", "PORT", "LOG_LEVEL", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name in _OURS or name.startswith("CPI_PROXY_"):
            monkeypatch.delenv(name)
