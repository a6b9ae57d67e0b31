"""Emulated XSUAA and CPI iFlow runtime, served over TLS from a throw-away CA.

Why: tests and ``cpi-proxy dev`` need the proxy's real counterparts on loopback, not mocks.
"""

from proxy.dev.ca import DevCA, make_dev_ca
from proxy.dev.iflow import (
    GZIP_BODY,
    GZIP_PLAINTEXT,
    EmulatedIflowRuntime,
    RecordedRequest,
    cpi_token_of,
)
from proxy.dev.xsuaa import (
    DEFAULT_CPI_PARAMS,
    JWT_BEARER,
    EmulatedXsuaa,
    Fault,
    OAuthClient,
    Parking,
    cached_rsa_key,
    load_cpi_params,
)

__all__ = [
    "DEFAULT_CPI_PARAMS",
    "GZIP_BODY",
    "GZIP_PLAINTEXT",
    "JWT_BEARER",
    "DevCA",
    "EmulatedIflowRuntime",
    "EmulatedXsuaa",
    "Fault",
    "OAuthClient",
    "Parking",
    "RecordedRequest",
    "cached_rsa_key",
    "cpi_token_of",
    "load_cpi_params",
    "make_dev_ca",
]
