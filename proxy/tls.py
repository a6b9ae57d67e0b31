"""TLS client contexts: the system trust store, optionally with a client certificate (mTLS).

OpenSSL honours SSL_CERT_FILE / SSL_CERT_DIR, so private landscapes and tests add a CA without
code. `ssl` loads certificates only from files: an x509 binding's PEMs go to a private temp dir
(0700, files 0600) for the instant `load_cert_chain` reads them, and are deleted right after.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path


def client_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def mtls_context(certificate: str, key: str) -> ssl.SSLContext:
    """A client context presenting `certificate` (PEM, chain allowed) with `key`."""
    context = client_context()
    with tempfile.TemporaryDirectory(prefix="cpi-proxy-mtls-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        for path, text in ((cert_file, certificate), (key_file, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(text)
        context.load_cert_chain(cert_file, key_file)
    return context
