"""A throw-away certificate authority for serving the emulators over real TLS.

Why: the proxy must talk HTTPS to XSUAA and CPI, and tests should exercise that path (SNI,
hostname checks, a custom trust store) instead of a plain-HTTP shortcut. The certificates pass
strict verification (Python 3.13's VERIFY_X509_STRICT) so they keep working on newer Pythons.
The CA also issues client certificates, for XSUAA's x509 (mutual TLS) client authentication.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCA", "make_dev_ca"]


@dataclass(frozen=True)
class DevCA:
    """A CA certificate plus one server leaf it signed; everything in PEM.

    ``ca_key_pem`` lets the CA issue client certificates; a DevCA built without it can still
    serve TLS but not issue.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_key_pem: bytes = field(repr=False, default=b"")

    def server_context(self) -> ssl.SSLContext:
        """TLS server context serving the leaf.

        load_cert_chain only reads files, so the key touches disk briefly: in a private
        directory, mode 0600, removed as soon as it is loaded.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory(prefix="cpi-proxy-tls-") as tmp:
            cert_file = _write_private(Path(tmp) / "cert.pem", self.cert_pem)
            key_file = _write_private(Path(tmp) / "key.pem", self.key_pem)
            ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def mtls_server_context(self) -> ssl.SSLContext:
        """Like ``server_context`` but demanding a client certificate issued by this CA.

        A client without a certificate, or with one from another CA, fails the handshake: the
        way XSUAA's certificate endpoint (``*.authentication.cert.*``) treats such clients.
        """
        ctx = self.server_context()
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        return ctx

    def issue_client_cert(self, common_name: str, *, ca: DevCA | None = None) -> tuple[str, str]:
        """A TLS client certificate ``(cert_pem, key_pem)`` for subject CN ``common_name``.

        Signed by this CA, or by ``ca`` when given (a foreign issuer for negative tests).
        """
        issuer = ca or self
        if not issuer.ca_key_pem:
            raise ValueError("this DevCA has no CA key, so it cannot issue certificates")
        ca_cert = x509.load_pem_x509_certificate(issuer.ca_pem)
        ca_key = serialization.load_pem_private_key(issuer.ca_key_pem, password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an EC key")
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - dt.timedelta(hours=1), ca_cert.not_valid_before_utc))
            .not_valid_after(min(now + dt.timedelta(days=2), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        return cert_pem.decode("ascii"), _pkcs8(key).decode("ascii")

    def client_context(self) -> ssl.SSLContext:
        """Client context trusting only this CA, verifying strictly even on Python < 3.13."""
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx

    def write_ca(self, directory: Path) -> Path:
        """Write ca.pem (public, so no special mode) for use as SSL_CERT_FILE."""
        path = directory / "ca.pem"
        path.write_bytes(self.ca_pem)
        return path


def make_dev_ca(hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1")) -> DevCA:
    """Create a CA and a server leaf valid for ``hosts`` (names or IP literals).

    EC P-256 keeps this fast enough to run per test session; validity starts an hour in the
    past so small clock skews between processes do not matter.
    """
    if not hosts:
        raise ValueError("make_dev_ca needs at least one host")
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cpi-proxy dev CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    return DevCA(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=leaf_cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_pkcs8(leaf_key),
        ca_key_pem=_pkcs8(ca_key),
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
