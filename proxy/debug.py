"""`GET /_debug/tokens`: the user token and the CPI token it was exchanged for, side by side.

Only with CPI_PROXY_DEBUG=1, only for a valid user token (and the debug scope when one is set).
It shows selected claims, never a raw token or signature: the page exists to answer "why does
CPI refuse me?" (which roles made it into the CPI token), not to hand tokens out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

import jwt
from aiohttp import web

from proxy.auth import authorize, bearer_token
from proxy.state import BINDINGS, PIPELINE, SETTINGS

CLAIMS = (
    "aud",
    "client_id",
    "cid",
    "grant_type",
    "scope",
    "origin",
    "user_name",
    "given_name",
    "family_name",
    "zid",
    "xs.system.attributes",
    "exp",
)


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="none">-</td>'
    if isinstance(value, list):
        return "<td>" + "<br>".join(html.escape(str(v)) for v in value) + "</td>"
    if isinstance(value, dict):
        return f"<td><pre>{html.escape(json.dumps(value, indent=1))}</pre></td>"
    return f"<td>{html.escape(str(value))}</td>"


def render(user: Mapping[str, Any], cpi: Mapping[str, Any], cpi_prefix: str) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th>{_cell(user.get(name))}{_cell(cpi.get(name))}</tr>"
        for name in CLAIMS
    )
    roles = sorted(s[len(cpi_prefix) :] for s in cpi.get("scope", []) if s.startswith(cpi_prefix))
    summary = (
        ", ".join(html.escape(r) for r in roles) or "none: CPI will refuse role-protected iFlows"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>cpi-proxy tokens</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        ".none{color:#999}</style></head><body>"
        "<h1>Your token and the CPI token it becomes</h1>"
        f"<p>CPI roles in the exchanged token: <b>{summary}</b></p>"
        "<table><tr><th>claim</th><th>user token (your XSUAA)</th>"
        "<th>CPI token (jwt-bearer)</th></tr>"
        f"{rows}</table></body></html>"
    )


async def tokens_page(app: web.Application, request: web.Request) -> web.Response:
    pipeline, settings = app[PIPELINE], app[SETTINGS]
    token = bearer_token(request.headers.getall("Authorization", []))
    claims = await pipeline.validator.validate(token)
    if settings.debug_scope:
        scope = settings.debug_scope.replace("$XSAPPNAME", app[BINDINGS].xsuaa.xsappname)
        authorize(claims, (scope,))
    cpi = await pipeline.exchanger.for_user(claims, token)
    cpi_claims = jwt.decode(cpi.access_token, options={"verify_signature": False})
    prefix = app[BINDINGS].cpi.xsappname + "."
    user_claims = jwt.decode(token, options={"verify_signature": False})  # validated above
    page = render(user_claims, cpi_claims, prefix)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})
