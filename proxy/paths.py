"""Request-path normalisation: the one place that decides what path a request means.

Routing and forwarding both see the normalised path, so a route guarded by a scope cannot be
reached through `..`, `%2e%2e`, `%2f` or Tomcat's `..;` tricks, and CPI never sees a path that
differs from the one the route table chose.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from proxy.errors import BadRequest

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOT_OR_SLASH = {"2e": ".", "2f": "/"}
_FORBIDDEN_ESCAPES = {"00": "NUL", "5c": "backslash"}


def split_target(raw: str) -> tuple[str, str]:
    """Split a raw request-target into (path, query); the query stays byte-exact."""
    path, sep, query = raw.partition("?")
    return path, query if sep else ""


def _decode_dots_and_slashes(path: str) -> str:
    def swap(m: re.Match[str]) -> str:
        code = m.group(1).lower()
        if code in _FORBIDDEN_ESCAPES:
            raise BadRequest(f"the path contains an encoded {_FORBIDDEN_ESCAPES[code]}")
        return _DOT_OR_SLASH.get(code, m.group(0))

    return _ESCAPE.sub(swap, path)


_UNSAFE = re.compile(r"[^\x21-\x7e]|[\\#]")  # controls, space, non-ASCII, backslash, #


def normalise(path: str) -> str:
    """Decode %2e/%2f, resolve dot segments; raise BadRequest for anything ambiguous."""
    if not path.startswith("/"):
        raise BadRequest("the request path must start with /")
    if _UNSAFE.search(path):
        raise BadRequest(
            "the path contains a control, non-ASCII, backslash or # character; percent-encode it"
        )
    if "%" in path:
        if _BAD_ESCAPE.search(path):
            raise BadRequest("the path has a malformed percent-escape (use %XX)")
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the path does not percent-decode to UTF-8") from None
        path = _decode_dots_and_slashes(path)
    out: list[str] = []
    segments = path.split("/")[1:]
    for segment in segments:
        bare = segment.split(";", 1)[0]  # Tomcat reads "..;x" as ".."
        if bare == ".":
            continue
        if bare == "..":
            if not out:
                raise BadRequest("the path climbs above the root with '..'")
            out.pop()
            continue
        out.append(segment)
    if segments and segments[-1].split(";", 1)[0] in (".", ".."):
        out.append("")  # "/a/b/.." means the directory "/a/"
    return "/" + "/".join(out)
