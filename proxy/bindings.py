"""Service bindings (VCAP_SERVICES) -> `XsuaaBinding` and `CpiBinding`.

cfenv is used only here, at the edge. Secrets are `repr=False` so a binding can be logged or
printed by `cpi-proxy check` without leaking them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import cfenv
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.errors import ConfigError

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass(frozen=True)
class XsuaaBinding:
    """The app's own XSUAA instance: it signs the user tokens cpi-proxy accepts.

    Only public facts are needed to validate tokens, so its secret or certificate is not kept.
    """

    name: str
    clientid: str
    url: str
    uaadomain: str
    xsappname: str
    zone_id: str
    verificationkey: str | None = field(default=None, repr=False)

    @property
    def jwks_url(self) -> str:
        # Keys come only from the bound uaadomain, never from a URL named in a token.
        return f"https://{self.uaadomain}/token_keys?zid={quote(self.zone_id, safe='')}"


@dataclass(frozen=True)
class CpiBinding:
    """The it-rt (integration-flow) instance: its client mints CPI tokens; `url` is the runtime.

    Authenticated by `clientsecret` (HTTP Basic) or, for x509 bindings, by `certificate` + `key`
    over mutual TLS at the certificate endpoint (then `tokenurl` is that endpoint).
    """

    name: str
    clientid: str
    tokenurl: str
    url: str
    clientsecret: str | None = field(default=None, repr=False)
    certificate: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    @property
    def x509(self) -> bool:
        return self.certificate is not None

    @property
    def xsappname(self) -> str:
        """The it-rt app's xsappname, which prefixes CPI scopes (`<xsappname>.cpitex.Read`);
        XSUAA client ids of service instances read `sb-<guid>!b<n>|<xsappname>`."""
        return self.clientid.rpartition("|")[2]

    def scope_of(self, role: str) -> str:
        return f"{self.xsappname}.{role}"


@dataclass(frozen=True)
class Bindings:
    xsuaa: XsuaaBinding
    cpi: CpiBinding


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(what: str, url: str) -> str:
    """An https URL, or http on loopback only (dev mode and tests); returned without trailing /."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{what}={url!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(f"{what}={url!r} uses plain http; only https is allowed off loopback")
    return url.rstrip("/")


def _check_host_port(what: str, value: str) -> None:
    try:
        parts = urlsplit("//" + value)
        ok = bool(parts.hostname) and not parts.path and not parts.query and parts.port != 0
    except ValueError:
        ok = False
    if not ok or "@" in value:
        raise ConfigError(f"{what}={value!r} must be a host name with an optional :port")


def _services(environ: Mapping[str, str]) -> list[Any]:
    raw = environ.get("VCAP_SERVICES")
    if not raw:
        raise ConfigError(
            "VCAP_SERVICES is not set and no default-env.json was found: bind an xsuaa and an"
            " it-rt service, or create default-env.json"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"VCAP_SERVICES is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConfigError("VCAP_SERVICES must be an object of service lists")
    return [cfenv.Service(entry) for group in data.values() for entry in group]


def _find(services: list[Any], label: str, name: str | None, what: str) -> Any:
    if name is not None:
        found = [s for s in services if cfenv.match_all(s.env, {"name": name})]
        if not found:
            raise ConfigError(f"VCAP_SERVICES has no service named {name!r} (the {what} binding)")
        return found[0]
    found = [s for s in services if cfenv.match_all(s.env, {"label": label})]
    if not found:
        raise ConfigError(f"VCAP_SERVICES has no service with label {label!r} (the {what} binding)")
    if len(found) > 1:
        names = ", ".join(repr(s.name) for s in found)
        raise ConfigError(
            f"several {label!r} services are bound ({names}); name one in the route file's"
            f' "{"xsuaa" if label == "xsuaa" else "cpi"}": {{"service": ...}}'
        )
    return found[0]


def _require(creds: Mapping[str, Any], key: str, where: str) -> str:
    value = creds.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} lacks credentials.{key}")
    return value


def _xsuaa(service: Any) -> XsuaaBinding:
    creds: Mapping[str, Any] = service.credentials
    where = f"xsuaa service {service.name!r}"
    zone = creds.get("identityzoneid") or creds.get("tenantid")
    if not isinstance(zone, str) or not zone:
        raise ConfigError(f"{where} lacks credentials.identityzoneid (or tenantid)")
    uaadomain = _require(creds, "uaadomain", where)
    _check_host_port(f"{where} credentials.uaadomain", uaadomain)
    key = creds.get("verificationkey")
    return XsuaaBinding(
        name=str(service.name),
        clientid=_require(creds, "clientid", where),
        url=check_url(f"{where} credentials.url", _require(creds, "url", where)),
        uaadomain=uaadomain,
        xsappname=_require(creds, "xsappname", where),
        zone_id=zone,
        verificationkey=key if isinstance(key, str) and key.strip() else None,
    )


def _cpi(service: Any) -> CpiBinding:
    where = f"it-rt service {service.name!r}"
    plan = service.env.get("plan")
    if plan not in (None, "integration-flow"):
        raise ConfigError(
            f"{where} has plan {plan!r}; cpi-proxy needs a binding of plan integration-flow"
        )
    outer: Mapping[str, Any] = service.credentials
    nested = outer.get("oauth")
    creds: Mapping[str, Any] = nested if isinstance(nested, dict) else outer
    common = {
        "name": str(service.name),
        "clientid": _require(creds, "clientid", where),
        "url": check_url(f"{where} credentials.url", _require(creds, "url", where)),
    }
    if creds.get("clientsecret") or not creds.get("certificate"):
        tokenurl = _require(creds, "tokenurl", where)
        return CpiBinding(
            **common,
            tokenurl=check_url(f"{where} credentials.tokenurl", tokenurl),
            clientsecret=_require(creds, "clientsecret", where),
        )
    certificate, key = _require(creds, "certificate", where), _require(creds, "key", where)
    _check_pem(where, certificate, key)
    return CpiBinding(
        **common,
        tokenurl=check_url(f"{where} certificate token URL", cert_token_url(creds, where)),
        certificate=certificate,
        key=key,
    )


def cert_token_url(creds: Mapping[str, Any], where: str) -> str:
    """x509 token requests go to the certificate endpoint: `certurl`, else the tokenurl's host
    with `.authentication.` turned into `.authentication.cert.` (XSUAA's naming)."""
    certurl = creds.get("certurl")
    if isinstance(certurl, str) and certurl:
        return certurl.rstrip("/") + "/oauth/token"
    tokenurl = _require(creds, "tokenurl", where)
    parts = urlsplit(tokenurl)
    host = parts.netloc
    if ".authentication." in host and ".authentication.cert." not in host:
        host = host.replace(".authentication.", ".authentication.cert.", 1)
    return parts._replace(netloc=host).geturl()


def _check_pem(where: str, certificate: str, key: str) -> None:
    """Refuse at start what mutual TLS would refuse on the first request."""
    try:
        x509.load_pem_x509_certificate(certificate.encode("ascii"))
        serialization.load_pem_private_key(key.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ConfigError(
            f"{where}: credentials.certificate/key are not a PEM certificate and unencrypted key"
        ) from None


def load_bindings(
    environ: Mapping[str, str], *, xsuaa_service: str | None = None, cpi_service: str | None = None
) -> Bindings:
    services = _services(environ)
    return Bindings(
        xsuaa=_xsuaa(_find(services, "xsuaa", xsuaa_service, "XSUAA")),
        cpi=_cpi(_find(services, "it-rt", cpi_service, "CPI runtime")),
    )
