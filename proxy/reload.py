"""Live route reload: operators change mappings without a restart.

`RouteState.table` is swapped whole; a request reads it once at its start, so requests in flight
finish on the table they began with. A file that does not load is rejected with a logged error
and the old table stays in force. Reloads come from SIGHUP and from a cheap mtime/size poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from proxy.errors import ConfigError
from proxy.routes import RouteTable, load_routes

log = logging.getLogger(__name__)


def warn_public_routes(table: RouteTable) -> None:
    for route in table.routes:
        if route.authentication == "none":
            log.warning(
                "route %r is public (authenticationType none): anyone who reaches the proxy"
                " calls CPI as the technical user",
                route.name,
            )


class RouteState:
    def __init__(self, table: RouteTable, xsappname: str, path: Path | None = None) -> None:
        self.table = table.resolve(xsappname)
        self._xsappname = xsappname
        self._path = path
        self._seen = self._fingerprint()

    def _fingerprint(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def reload(self) -> bool:
        """Load the route file again; True if the new table is in force."""
        self._seen = self._fingerprint()
        if self._path is None:
            log.error("route reload requested, but the routes did not come from a file")
            return False
        try:
            table = load_routes(self._path)
            if (table.xsuaa_service, table.cpi_service) != (
                self.table.xsuaa_service,
                self.table.cpi_service,
            ):
                raise ConfigError("the xsuaa/cpi service names changed; that needs a restart")
        except ConfigError as exc:
            log.error("route file rejected, the previous routes stay in force: %s", exc)
            return False
        self.table = table.resolve(self._xsappname)
        warn_public_routes(self.table)
        log.info("reloaded %d route(s) from %s", len(self.table.routes), self._path)
        return True

    async def watch(self, interval: float) -> None:
        """Poll the file's mtime and size; one stat per interval is all it costs."""
        while True:
            await asyncio.sleep(interval)
            if self._fingerprint() != self._seen:
                self.reload()
