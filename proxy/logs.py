"""Logging: one JSON object per line, in SAP's Cloud Foundry logging shape.

Fields follow cf-java-logging-support / cf-nodejs-logging-support (`written_at`, `level`, `msg`,
`logger`, `correlation_id`, `component_name`, ...), so Kibana/Cloud Logging dashboards built for
SAP apps read them as they are. Request lines carry `type: request`. On a terminal the same
records are printed as plain text. Nothing here ever sees a token: callers log facts, not headers.

One exception is not ours: aiohttp's server logs every request head its parser refuses
(malformed, a line over 32 KiB, too many fields) at ERROR with a traceback and a message that may
quote the refused bytes, so any client could flood the log, with its own bytes. `ParseErrors`
makes each one INFO line without traceback or quotes (the client's fault, not ours).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

from proxy.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
correlation: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")

# Request-log fields passed through `extra=`; everything else on a record is logging's own.
REQUEST_FIELDS = (
    "type",
    "method",
    "request",
    "status_code",
    "response_time_ms",
    "response_size_b",
    "route",
    "user",
    "remote_ip",
)


def component(environ: Mapping[str, str]) -> dict[str, Any]:
    """The app's identity from VCAP_APPLICATION, as SAP's logging libraries report it."""
    try:
        app = json.loads(environ.get("VCAP_APPLICATION", "{}"))
    except ValueError:
        app = {}
    if not isinstance(app, dict):
        app = {}
    fields = {
        "component_name": app.get("application_name") or app.get("name") or "cpi-proxy",
        "component_id": app.get("application_id"),
        "component_type": "application",
        "component_instance": environ.get("CF_INSTANCE_INDEX", app.get("instance_index")),
        "space_name": app.get("space_name"),
        "organization_name": app.get("organization_name"),
    }
    return {k: v for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def __init__(self, static: Mapping[str, Any]) -> None:
        super().__init__()
        self._static = dict(static)

    def format(self, record: logging.LogRecord) -> str:
        written = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "written_at": written.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "written_ts": int(record.created * 1e9),
            "type": "log",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "correlation_id": correlation.get(),
            **self._static,
        }
        for name in REQUEST_FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info:
            out["stacktrace"] = self.formatException(record.exc_info).splitlines()
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """For a human at a terminal: time, level, logger, message, correlation id."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        cid = correlation.get()
        return text if cid == "-" else f"{text} [{cid}]"


class ParseErrors(logging.Filter):
    """On `aiohttp.server`: a record carrying an aiohttp parse error becomes one INFO line.

    aiohttp 3.14 logs a refused head in `RequestHandler.handle_error`, through `log_exception`
    ("Error handling request from %s", exc_info=the HttpProcessingError: BadHttpMessage,
    LineTooLong, InvalidHeader, BadStatusLine, ...), at ERROR; only a bad method on a
    connection's first request is DEBUG already. The exception's message may quote the bytes it
    refused (a token, say): it is kept on one line, with anything quoted elided, in printable
    ASCII and at most KEEP characters. Records of any other exception (an error in a
    handler) pass untouched.
    """

    LOGGER = "aiohttp.server"
    KEEP = 80
    QUOTED = re.compile(r"""b?'(?:\\.|[^'\\])*'?|b?"(?:\\.|[^"\\])*"?""")  # reprs, maybe cut

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        source = args[0] if record.msg == "Error handling request from %s" and args else "?"
        record.msg = "bad request from %s: %s: %s"
        record.args = (source, type(exc).__name__, self.summary(exc.message))
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno = min(record.levelno, logging.INFO)
        record.levelname = logging.getLevelName(record.levelno)
        return logging.getLogger(record.name).isEnabledFor(record.levelno)

    @classmethod
    def summary(cls, message: str) -> str:
        """The parser's words without what the client sent, on one line: `Got more than 32768
        bytes when reading: '...'.`, `Bad status line: Invalid HTTP version: '...'`."""
        text = cls.QUOTED.sub("'...'", " ".join(message.split())).rstrip(" ^:")
        return "".join(c if " " <= c <= "~" else "?" for c in text)[: cls.KEEP]


def configure(environ: Mapping[str, str], stream: TextIO | None = None) -> None:
    """LOG_LEVEL; JSON unless writing to a terminal (CPI_PROXY_LOG_FORMAT=json|text forces)."""
    level = environ.get("LOG_LEVEL", "INFO").upper()
    if level not in LEVELS:
        raise ConfigError(f"LOG_LEVEL={level!r} is not one of {', '.join(LEVELS)}")
    stream = stream or sys.stdout
    wanted = environ.get("CPI_PROXY_LOG_FORMAT", "").lower()
    if wanted not in ("", "json", "text"):
        raise ConfigError(f"CPI_PROXY_LOG_FORMAT={wanted!r} is not json or text")
    text = wanted == "text" or (not wanted and stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if text else JsonFormatter(component(environ)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    server = logging.getLogger(ParseErrors.LOGGER)
    if not any(isinstance(f, ParseErrors) for f in server.filters):
        server.addFilter(ParseErrors())
