"""The key store against the emulated XSUAA: cached, refreshed once, never a stampede."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.dev import EmulatedXsuaa
from proxy.errors import InvalidToken, KeysUnavailable
from proxy.keys import KeyStore, load_pem_key
from tests.conftest import FakeClock, until


def store(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa, clock: FakeClock, **kwargs: object
) -> KeyStore:
    url = f"https://{xsuaa.uaadomain}/token_keys?zid={xsuaa.zone_id}"
    return KeyStore(session, url, clock=clock, **kwargs)  # type: ignore[arg-type]


async def test_concurrent_cold_lookups_share_one_fetch(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    keys = store(session, xsuaa, FakeClock())
    found = await asyncio.gather(*(keys.get("key-1") for _ in range(50)))
    assert len({id(k) for k in found}) == 1
    assert xsuaa.key_fetches == 1


async def test_unknown_kid_refreshes_at_most_once_per_interval(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    clock = FakeClock()
    keys = store(session, xsuaa, clock, min_refresh=30.0)
    await keys.get("key-1")
    clock.advance(31)
    for kid in ("random-1", "random-2", "random-3"):
        with pytest.raises(InvalidToken, match="unknown key id"):
            await keys.get(kid)
    assert xsuaa.key_fetches == 2  # the start, then one refresh for the whole flood
    clock.advance(31)
    new_kid = xsuaa.rotate_key()
    assert await keys.get(new_kid) is not None
    assert xsuaa.key_fetches == 3


async def test_stale_keys_keep_serving_while_xsuaa_is_down(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    clock = FakeClock()
    keys = store(session, xsuaa, clock, ttl=900.0)
    key = await keys.get("key-1")
    xsuaa.keys_fault = "unavailable"
    clock.advance(901)
    assert await keys.get("key-1") is key
    await until(lambda: xsuaa.key_fetches == 2)  # it tried, in the background
    assert await keys.get("key-1") is key


async def test_a_slow_xsuaa_never_delays_known_keys(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    clock = FakeClock()
    keys = store(session, xsuaa, clock, ttl=900.0)
    key = await keys.get("key-1")
    xsuaa.keys_fault = "hang"
    clock.advance(901)
    async with asyncio.timeout(1):
        assert await keys.get("key-1") is key


async def test_keys_down_at_start_without_fallback_is_503(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.keys_fault = "garbage"
    with pytest.raises(KeysUnavailable, match="cannot fetch verification keys"):
        await store(session, xsuaa, FakeClock()).get("key-1")


async def test_verificationkey_is_the_fallback_when_keys_cannot_be_fetched(
    session: aiohttp.ClientSession, xsuaa: EmulatedXsuaa
) -> None:
    xsuaa.keys_fault = "unavailable"
    pem = xsuaa.vcap_credentials_xsuaa()["verificationkey"]
    key = await store(session, xsuaa, FakeClock(), fallback_pem=pem).get("key-1")
    assert key.public_numbers() == xsuaa.public_keys()["key-1"].public_numbers()


def test_verificationkey_on_one_line_is_accepted(xsuaa: EmulatedXsuaa) -> None:
    pem = xsuaa.vcap_credentials_xsuaa()["verificationkey"]
    one_line = pem.replace("\n", "")
    assert load_pem_key(one_line) is not None
    assert load_pem_key("not a key") is None
