"""Memory per cached user: fill the validated-token and CPI-token caches with N users.

Real tokens are minted once by the emulated XSUAA (user and CPI token); each entry gets its own
copy of the strings and claims, so the figure is what N distinct users cost.
    python bench/memory.py [--users 100000]
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

import jwt

from proxy.auth import Claims, shared_scopes
from proxy.dev import EmulatedXsuaa
from proxy.exchange import CpiToken
from proxy.lru import ExpiringLRU


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    users = parser.parse_args().users
    xsuaa = EmulatedXsuaa()
    user_token = xsuaa.mint_user_token("someone.with.a.long.name@example.com")
    payload = jwt.decode(user_token, options={"verify_signature": False})
    cpi_token = user_token  # a CPI token is the same size as the user token it came from
    gc.collect()
    before = rss_mib()
    claims_cache: dict[bytes, Claims] = {}
    tokens: ExpiringLRU[bytes, CpiToken] = ExpiringLRU(
        users, deadline=lambda t: t.cache_until, clock=time.monotonic
    )
    now = time.monotonic()
    for i in range(users):
        unique = f"{i:08d}"
        digest = hashlib.sha256(unique.encode()).digest()
        raw = copy.deepcopy(payload)
        raw["user_name"] = raw["user_name"] + unique
        claims_cache[digest] = Claims(
            token_hash=digest,
            subject=raw["user_name"],
            scopes=shared_scopes(raw["scope"]),  # as the validator builds them
            zone_id=sys.intern(raw["zid"]),
            client_id=sys.intern(raw["client_id"]),
            expires_at=raw["exp"],
            origin=sys.intern(raw["origin"]),
        )
        tokens[digest] = CpiToken(
            access_token=cpi_token[:-8] + unique,
            scopes=shared_scopes(raw["scope"]),
            expires_at=now + 43_000,
            cache_until=now + 42_000,
            fetched_at=now,
        )
    gc.collect()
    grown = rss_mib() - before
    report = {
        "users": users,
        "token_bytes": len(user_token),
        "rss_growth_mib": round(grown, 1),
        "bytes_per_user": round(grown * 1024 * 1024 / users),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
