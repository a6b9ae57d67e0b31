"""Fuzz targets for the two places where untrusted input meets logic: the token validator and
the route mapper.

The validator is fed (a) arbitrary text and (b) JWTs built like XSUAA's, then mutated: alg
spellings (none, HS256 signed with the public key, RS256 in other cases), kid types and values,
jku/x5u/jwk/x5c/crit headers, missing, extra and mistyped claims, oversized tokens, broken
encodings; signed with the emulator's key, a foreign one, or not at all. The only outcomes
allowed are `Claims` (only where the emulator signed valid claims), `InvalidToken` or
`KeysUnavailable`; any other exception, or no answer within 5 s, is a finding. The fuzzer is a
seeded mutation loop in one async test, because the validator needs the emulated XSUAA's keys and
Hypothesis's @given does not run inside pytest-aiohttp's event loop.

The route mapper is pure, so Hypothesis drives it directly: random route tables (regexes from a
small grammar, targets under /http/ with $n references) and paths; loading and mapping may only
raise ConfigError or a ProxyError, and a mapped path never leaves /http/.

    make test                                                  # 2000 iterations, a few seconds
    CPI_PROXY_FUZZ_ITERATIONS=200000 .venv/bin/python -m pytest tests/test_fuzz.py -s
    CPI_PROXY_FUZZ_SEED=7 ...                                  # another validator sequence

Both variables are read at import, since conftest clears CPI_PROXY_* before every test; the
route fuzzer runs a tenth as many tables (at least 200). `-s` shows the counts, which are also
recorded as junit-xml properties.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import os
import random
import re
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth import MAX_TOKEN_BYTES, Claims, TokenValidator
from proxy.bindings import load_bindings
from proxy.dev import EmulatedXsuaa, cached_rsa_key
from proxy.errors import ConfigError, InvalidToken, KeysUnavailable, ProxyError
from proxy.keys import KeyStore
from proxy.paths import normalise, split_target
from proxy.routes import HTTP_METHODS, TARGET_PREFIX, parse_routes
from proxy.settings import Settings
from tests.test_properties import PATH_PIECES, expected_audience, forwarded_path, table_says

ITERATIONS = int(os.environ.get("CPI_PROXY_FUZZ_ITERATIONS", "2000"))
SEED = int(os.environ.get("CPI_PROXY_FUZZ_SEED", "20240611"))
ROUTE_TABLES = max(200, ITERATIONS // 10)

RecordProperty = Callable[[str, object], None]

# --- token building ----------------------------------------------------------------------

Verdict = Literal["keeps", "breaks", "unknown"]  # what a mutation does to a valid token
KEEPS: Verdict = "keeps"
BREAKS: Verdict = "breaks"
UNKNOWN: Verdict = "unknown"
_RANK = {KEEPS: 0, UNKNOWN: 1, BREAKS: 2}
RSA_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "RS256": hashes.SHA256,
    "RS384": hashes.SHA384,
    "RS512": hashes.SHA512,
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@dataclass
class Case:
    """One fuzzed token and what an honest validator must make of it."""

    header: Any
    claims: Any
    labels: list[str] = field(default_factory=list)
    raw_header: bytes | None = None  # replaces the JSON of `header` when set
    raw_claims: bytes | None = None
    parts: dict[str, Verdict] = field(default_factory=dict)  # "header.kid", "signature", ...

    def mark(self, part: str, label: str, verdict: Verdict) -> None:
        """What the latest edit of `part` (a header field, a claim, the signature...) did."""
        self.labels.append(label)
        self.parts[part] = verdict

    def replace(self, section: str, raw: bytes, label: str, verdict: Verdict) -> None:
        """Raw bytes replace a whole section, and with it what earlier edits in it did."""
        if section == "header":
            self.raw_header = raw
        else:
            self.raw_claims = raw
        for part in [p for p in self.parts if p.startswith(section + ".")]:
            del self.parts[part]
        self.mark(section + ".raw", label, verdict)

    @property
    def verdict(self) -> Verdict:
        return max(self.parts.values(), key=_RANK.__getitem__, default=KEEPS)

    def signing_input(self) -> str:
        header = self.raw_header if self.raw_header is not None else json.dumps(self.header)
        claims = self.raw_claims if self.raw_claims is not None else json.dumps(self.claims)
        as_bytes = [p if isinstance(p, bytes) else p.encode() for p in (header, claims)]
        return f"{b64(as_bytes[0])}.{b64(as_bytes[1])}"


@dataclass(frozen=True)
class World:
    xsuaa: EmulatedXsuaa
    signing_kid: str
    key: rsa.RSAPrivateKey
    foreign: rsa.RSAPrivateKey
    public_pem: bytes
    base_claims: dict[str, Any]


def rsa_sign(key: rsa.RSAPrivateKey, alg: str, message: str) -> str:
    return b64(key.sign(message.encode(), padding.PKCS1v15(), RSA_HASHES[alg]()))


# --- header mutations --------------------------------------------------------------------

ODD_ALGS: list[Any] = [
    *("rs256", "Rs256", "rS256", "RS256 ", " RS256", "RS256\x00", "RS1", "RS"),
    *("none", "None", "NONE", "nOnE", "HS256", "hs256", "HS384", "HS512", "ES256", "PS256"),
    *("EdDSA", "", None, 256, True, ["RS256"], {"alg": "RS256"}),
]
ODD_KIDS: list[Any] = [
    *("key-2", "KEY-1", "key-1 ", " key-1", "", "x" * 300, "k" * 257, "../token_keys", "\u212a"),
    *("key-1\x00", "%6Bey-1", None, 1, 1.0, True, ["key-1"], {"kid": "key-1"}),
]


def mutate_alg(case: Case, rng: random.Random, world: World) -> None:
    if rng.random() < 0.4:
        case.header["alg"] = rng.choice(["RS384", "RS512"])  # signed to match: still valid
        case.mark("header.alg", "alg=" + case.header["alg"], KEEPS)
    else:
        case.header["alg"] = rng.choice(ODD_ALGS)
        case.mark("header.alg", f"alg={case.header['alg']!r}", BREAKS)


def mutate_kid(case: Case, rng: random.Random, world: World) -> None:
    if rng.random() < 0.2:
        case.header.pop("kid", None)
        case.mark("header.kid", "no kid", BREAKS)
    else:
        case.header["kid"] = rng.choice(ODD_KIDS)
        case.mark("header.kid", f"kid={str(case.header['kid'])[:20]!r}", BREAKS)


def mutate_jku(case: Case, rng: random.Random, world: World) -> None:
    domain = world.xsuaa.uaadomain
    good = [f"https://{domain}/token_keys", f"https://tenant.{domain}/token_keys?zid=x"]
    bad: list[Any] = [
        *("https://evil.example/token_keys", f"http://{domain}/token_keys"),
        *(f"https://{domain}.evil.example/", f"https://evil.example#@{domain}/"),
        *(f"https://evil{domain}/", f"//{domain}/token_keys", "file:///etc/passwd"),
        *("https://[", "https://[::1", "https://x]/", "https://a\uff03b/", "https://\u2100/"),
        *(f"https://{domain}:99999/", 42, None, [f"https://{domain}/"], {"url": domain}),
    ]
    choice = rng.random()
    if choice < 0.2:
        case.header.pop("jku", None)
        case.mark("header.jku", "no jku", KEEPS)
    elif choice < 0.4:
        case.header["jku"] = rng.choice(good)
        case.mark("header.jku", "jku on uaadomain", KEEPS)
    else:
        case.header["jku"] = rng.choice(bad)
        case.mark("header.jku", f"jku={str(case.header['jku'])[:40]!r}", BREAKS)


def mutate_ignored_header(case: Case, rng: random.Random, world: World) -> None:
    """Headers XSUAA never sets and the validator must not follow: they change nothing."""
    foreign_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(world.foreign.public_key(), as_dict=True)
    name, value = rng.choice(
        [
            ("x5u", "https://evil.example/cert.pem"),
            ("jwk", foreign_jwk),
            ("x5c", ["MIIB" + "A" * 40]),
            ("x5t", "abc"),
            ("typ", rng.choice(["at+jwt", "JWS", "", None, 5])),
            ("cty", "JWT"),
            ("zid", "another-zone"),
            (rng.choice(["a", "\u00e9", "\x00", "__proto__"]), rng.choice([1, None, [], {}])),
        ]
    )
    case.header[name] = value
    case.mark(f"header.{name}", f"header {name}", KEEPS)


def mutate_crit(case: Case, rng: random.Random, world: World) -> None:
    case.header["crit"] = rng.choice([["exp"], [], ["b64"], "b64", None, [1]])
    case.mark("header.crit", "crit", BREAKS)


def mutate_b64(case: Case, rng: random.Random, world: World) -> None:
    case.header["b64"] = rng.choice([False, True, "false", 0])
    case.mark("header.b64", f"b64={case.header['b64']!r}", UNKNOWN)


def mutate_header_shape(case: Case, rng: random.Random, world: World) -> None:
    shape = rng.randrange(6)
    if shape == 0:
        raw = rng.choice([b"[]", b'"RS256"', b"1", b"null", b"{", b"", b"{'a':1}"])
        case.replace("header", raw, "header not an object", BREAKS)
    elif shape == 1:
        raw = rng.choice([b"\xff\xfe", b'{"alg":"RS256\xff"}', b"\x00" * 8])
        case.replace("header", raw, "header not UTF-8 JSON", BREAKS)
    elif shape == 2:
        raw = deep(rng.choice([50, 500, 1500, 3000, 5000])).encode()
        case.replace("header", raw, "header nested arrays", BREAKS)
    elif shape == 3:
        nested = f'{{"alg":"RS256","kid":"{world.signing_kid}","x":{deep(3000)}}}'
        case.replace("header", nested.encode(), "header with a deeply nested member", UNKNOWN)
    elif shape == 4:
        # Duplicate names: the last one wins in Python's json, as in PyJWT's own parse.
        raw = f'{{"alg":"none","kid":"{world.signing_kid}","alg":"RS256"}}'.encode()
        case.replace("header", raw, "duplicate alg", UNKNOWN)
    else:
        case.replace("header", b"{}", "empty header", BREAKS)


# --- claim mutations ---------------------------------------------------------------------

HUGE = 10**400  # valid JSON; no float can hold it


def mutate_exp(case: Case, rng: random.Random, world: World) -> None:
    now = int(time.time())
    value, verdict = rng.choice(
        [
            (now - 10, KEEPS),  # within the 60 s leeway
            (now + 7200, KEEPS),
            (now - 3600, BREAKS),
            (str(now + 3600), UNKNOWN),
            (now + 3600.5, UNKNOWN),
            (HUGE, UNKNOWN),
            (-HUGE, BREAKS),
            (1e308, UNKNOWN),
            (float("inf"), BREAKS),
            (float("nan"), BREAKS),
            ("soon", BREAKS),
            (None, BREAKS),
            (True, BREAKS),
            ([now + 3600], BREAKS),
            ({"exp": now + 3600}, BREAKS),
        ]
    )
    if rng.random() < 0.15:
        case.claims.pop("exp", None)
        case.mark("claims.exp", "no exp", BREAKS)
    else:
        case.claims["exp"] = value
        case.mark("claims.exp", f"exp={str(value)[:20]}", verdict)


def mutate_nbf_iat(case: Case, rng: random.Random, world: World) -> None:
    now = int(time.time())
    name = rng.choice(["nbf", "iat"])
    value, verdict = rng.choice(
        [
            (now - 100, KEEPS),
            (now + 30, KEEPS),  # within the leeway
            (now + 3600, BREAKS),
            (HUGE, BREAKS),
            ("yesterday", BREAKS),
            (None, BREAKS),
            ([1], BREAKS),
            (float("nan"), BREAKS),
        ]
    )
    if name == "iat" and rng.random() < 0.3:
        case.claims.pop("iat", None)
        case.mark("claims.iat", "no iat", KEEPS)
    else:
        case.claims[name] = value
        case.mark(f"claims.{name}", f"{name}={str(value)[:20]}", verdict)


def mutate_zid(case: Case, rng: random.Random, world: World) -> None:
    if rng.random() < 0.3:
        case.claims.pop("zid", None)
    else:
        zid = world.xsuaa.zone_id
        case.claims["zid"] = rng.choice([zid.upper(), zid + " ", "", None, 1, [zid], {zid: 1}])
    case.mark("claims.zid", "zid", BREAKS)


AUD_WORDS = [
    *("sb-cpitexxsappname!t4711", "cpitexxsappname!t4711", "cpitexxsappname!t4711.x"),
    *("cpitexxsappname!t4711evil", "evil.cpitexxsappname!t4711", "sb-cpitexxsappname!t4711."),
    *("", "uaa", "openid", "evil", "CPITEXXSAPPNAME!T4711"),
]


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            rng.choice(AUD_WORDS),
            [rng.choice(AUD_WORDS) for _ in range(rng.randrange(4))],
            [],
            None,
            0,
            5,
            -1.5,
            True,
            {rng.choice(AUD_WORDS): 1},
            [rng.choice(AUD_WORDS), 7, None, [rng.choice(AUD_WORDS)]],
            " ".join(rng.choice(AUD_WORDS) + ".Read" for _ in range(rng.randrange(3))),
        ]
    )


def mutate_audience(case: Case, rng: random.Random, world: World) -> None:
    """aud, scope and cid together decide the audience; the verdict is settled in `finish`."""
    name = rng.choice(["aud", "scope", "cid"])
    if rng.random() < 0.25:
        case.claims.pop(name, None)
        case.labels.append(f"no {name}")
    else:
        case.claims[name] = _odd_value(rng)
        case.labels.append(f"{name}={str(case.claims[name])[:40]}")


def mutate_identity(case: Case, rng: random.Random, world: World) -> None:
    name = rng.choice(["user_name", "client_id", "sub", "origin", "email", "user_id"])
    if rng.random() < 0.3:
        case.claims.pop(name, None)
    else:
        case.claims[name] = rng.choice([None, 0, "", "\u00e9\x00", ["a"], {"a": 1}, "x" * 500])
    # PyJWT insists that sub is a string; every other identity claim is only read here.
    case.mark(f"claims.{name}", f"identity {name}", UNKNOWN if name == "sub" else KEEPS)


def mutate_extra_claims(case: Case, rng: random.Random, world: World) -> None:
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(["ext", "\u00e9", "", "a" * 100, "xs.user.attributes", "jti", "iss"])
        case.claims[name] = rng.choice([None, 1, -0.0, "x", [], {}, [[1]], {"a": {"b": [None]}}])
        verdict = UNKNOWN if name == "jti" else KEEPS  # PyJWT insists on a string jti
        case.mark(f"claims.{name}", f"claim {name[:10]}", verdict)


def mutate_claims_shape(case: Case, rng: random.Random, world: World) -> None:
    shape = rng.randrange(4)
    if shape == 0:
        raw = rng.choice([b"[]", b'"claims"', b"1", b"null", b"{", b"", b"\xff"])
        case.replace("claims", raw, "claims not an object", BREAKS)
    elif shape == 1:
        case.claims["deep"] = json.loads(deep(200))
        case.mark("claims.deep", "claims nested 200 deep", KEEPS)
    elif shape == 2:
        raw = (json.dumps(case.claims)[:-1] + f',"deep":{deep(3000)}}}').encode()
        case.replace("claims", raw, "claims nested 3000 deep", UNKNOWN)
    else:
        # Just under or over the limit: the verdict follows the final length in `finish`.
        header = case.raw_header or json.dumps(case.header).encode()
        room = MAX_TOKEN_BYTES - len(b64(header)) - 2 - 342 + rng.randint(-100, 100)
        case.claims["pad"] = ""
        case.claims["pad"] = "p" * max(0, room * 3 // 4 - len(json.dumps(case.claims)))
        case.labels.append("near the size limit")


HEADER_MUTATIONS = [
    mutate_alg,
    mutate_kid,
    mutate_jku,
    mutate_ignored_header,
    mutate_crit,
    mutate_b64,
    mutate_header_shape,
]
CLAIM_MUTATIONS = [
    mutate_exp,
    mutate_nbf_iat,
    mutate_zid,
    mutate_audience,
    mutate_audience,
    mutate_identity,
    mutate_extra_claims,
    mutate_claims_shape,
]


def _audience_verdict(claims: dict[str, Any]) -> Verdict:
    aud, scope, cid = claims.get("aud"), claims.get("scope"), claims.get("cid")
    typed = (
        (aud is None or isinstance(aud, str) or _strings(aud))
        and (scope is None or isinstance(scope, str) or _strings(scope))
        and (cid is None or isinstance(cid, str))
    )
    if not typed:
        return UNKNOWN  # refusing is right, accepting debatable; crashing is the finding
    ours = expected_audience(claims, "sb-cpitexxsappname!t4711", "cpitexxsappname!t4711")
    return KEEPS if ours else BREAKS


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def structured(rng: random.Random, world: World) -> tuple[str, Case]:
    now = int(time.time())
    claims = copy.deepcopy(world.base_claims)
    claims.update(iat=now, exp=now + 3600, jti=uuid.UUID(int=rng.getrandbits(128)).hex)
    header = {
        "alg": "RS256",
        "kid": world.signing_kid,
        "typ": "JWT",
        "jku": f"https://{world.xsuaa.uaadomain}/token_keys",
    }
    case = Case(header, claims)
    for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 2, 3, 4])):
        on_header = rng.random() < 0.45
        if (case.raw_header if on_header else case.raw_claims) is not None:
            continue  # that part is raw bytes now: a dict edit would not reach the token
        mutate = rng.choice(HEADER_MUTATIONS if on_header else CLAIM_MUTATIONS)
        mutate(case, rng, world)
    if isinstance(case.claims, dict) and case.raw_claims is None:
        case.mark("audience", "audience", _audience_verdict(case.claims))
    message = case.signing_input()
    token = f"{message}.{sign(case, rng, world, message)}"
    return finish(token, case, rng)


def sign(case: Case, rng: random.Random, world: World, message: str) -> str:
    alg = case.header.get("alg") if isinstance(case.header, dict) else None
    matching = alg if isinstance(alg, str) and alg in RSA_HASHES else "RS256"
    how = rng.random()
    if how < 0.75:
        return rsa_sign(world.key, matching, message)
    if how < 0.82:
        case.mark("signature", "foreign key", BREAKS)
        return rsa_sign(world.foreign, matching, message)
    if how < 0.87:
        other = rng.choice([a for a in RSA_HASHES if a != matching])
        case.mark("signature", f"signed {other}, header says {alg!r}", BREAKS)
        return rsa_sign(world.key, other, message)
    if how < 0.92:
        # The classic key confusion: HMAC keyed with the RSA public key everyone can fetch.
        case.mark("signature", "HS256 with the public key", BREAKS)
        return b64(hmac.new(world.public_pem, message.encode(), hashlib.sha256).digest())
    if how < 0.96:
        case.mark("signature", "no signature", BREAKS)
        return ""
    case.mark("signature", "garbage signature", BREAKS)
    return rng.choice([b64(rng.randbytes(256)), "AAAA", "!!!", "a.b"])


def finish(token: str, case: Case, rng: random.Random) -> tuple[str, Case]:
    """Damage to the encoding itself, then the size rule, which overrides everything."""
    if rng.random() < 0.1:
        where = rng.randrange(len(token) + 1)
        junk = rng.choice([".", "=", "==", " ", "\n", "+", "/", "\u00e9", "\x00", "%2e", "\ud800"])
        token = token[:where] + junk + token[where:]
        case.mark("encoding", f"inserted {junk!r}", UNKNOWN)
    elif rng.random() < 0.05:
        token = token[: rng.randrange(len(token))]
        case.mark("encoding", "truncated", UNKNOWN)
    elif rng.random() < 0.03:
        token = token + "." + token
        case.mark("encoding", "doubled", BREAKS)
    if len(token) > MAX_TOKEN_BYTES:
        case.mark("size", "over the size limit", BREAKS)
    return token, case


# --- (a) arbitrary text ------------------------------------------------------------------

B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def arbitrary(rng: random.Random, world: World) -> tuple[str, Case]:
    case = Case(None, None, ["arbitrary"], parts={"token": BREAKS})
    kind = rng.randrange(7)
    if kind == 0:
        text = "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(200)))
    elif kind == 1:
        text = "".join(rng.choice(B64_CHARS + "..=") for _ in range(rng.randrange(400)))
    elif kind == 2:
        text = ".".join(b64(rng.randbytes(rng.randrange(64))) for _ in range(rng.randrange(1, 5)))
    elif kind == 3:
        head = b64(rng.choice([b'{"alg":"RS256","kid":"key-1"}', b'{"alg":"none"}', b"{}"]))
        text = f"{head}.{b64(rng.randbytes(rng.randrange(80)))}.{b64(rng.randbytes(8))}"
    elif kind == 4:
        text = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(60)))
    elif kind == 5:
        size = rng.choice([MAX_TOKEN_BYTES - 1, MAX_TOKEN_BYTES, MAX_TOKEN_BYTES + 1, 100_000])
        text = (
            "a" * (size // 3) + "." + "b" * (size // 3) + "." + "c" * (size - 2 * (size // 3) - 2)
        )
    else:
        text = rng.choice(["", ".", "..", "...", "Bearer", "null", "e30.e30.", "e30.e30.e30"])
    return text, case


# --- the validator fuzz target ------------------------------------------------------------


@pytest.fixture
async def world(xsuaa: EmulatedXsuaa) -> World:
    kid = xsuaa.signing_kid
    key = cached_rsa_key(kid)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    base = jwt.decode(xsuaa.mint_user_token("fuzz"), options={"verify_signature": False})
    return World(xsuaa, kid, key, cached_rsa_key("fuzz-foreign"), pem, base)


@pytest.fixture
def validator(xsuaa: EmulatedXsuaa, session: aiohttp.ClientSession) -> TokenValidator:
    """Built as proxy.app builds it, against the emulated XSUAA's key endpoint."""
    settings = Settings()
    vcap = xsuaa.vcap_services("https://cpi.invalid")
    binding = load_bindings({"VCAP_SERVICES": json.dumps(vcap)}).xsuaa
    keys = KeyStore(
        session,
        binding.jwks_url,
        fallback_pem=binding.verificationkey,
        ttl=settings.keys_ttl,
        min_refresh=settings.keys_min_refresh,
        timeout=settings.exchange_timeout,
    )
    return TokenValidator(binding, keys, leeway=settings.leeway, cache_size=settings.cache_size)


def where(exc: BaseException) -> str:
    """The innermost line of cpi-proxy the exception passed: where a fix would go."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/proxy/" in f.filename]
    if not frames:
        return "?"
    frame = frames[-1]
    return f"proxy/{frame.filename.rpartition('/proxy/')[2]}:{frame.lineno} ({frame.name})"


@dataclass
class Finding:
    what: str
    token: str
    labels: list[str]
    count: int = 1

    def __str__(self) -> str:
        shown = self.token if len(self.token) <= 160 else self.token[:160] + "..."
        return f"{self.what} x{self.count}: {self.labels} len={len(self.token)} {shown!r}"


async def test_token_validator_fuzz(
    world: World, validator: TokenValidator, record_property: RecordProperty
) -> None:
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    findings: dict[str, Finding] = {}
    started = time.perf_counter()
    for _ in range(ITERATIONS):
        token, case = (arbitrary if rng.random() < 0.2 else structured)(rng, world)
        what = ""
        try:
            async with asyncio.timeout(5):
                claims = await validator.validate(token)
        except InvalidToken:
            outcomes["InvalidToken"] += 1
            if case.verdict == KEEPS:
                what = "refused a token the emulator signed with valid claims"
        except KeysUnavailable:
            outcomes["KeysUnavailable"] += 1
        except TimeoutError:
            what = "no answer within 5 s"
        except Exception as exc:
            what = f"{type(exc).__name__} at {where(exc)}: {str(exc)[:70]}"
        else:
            outcomes["Claims"] += 1
            if case.verdict == BREAKS:
                what = f"accepted a bad token as {claims!r}"
            elif not isinstance(claims, Claims) or claims.zone_id != world.xsuaa.zone_id:
                what = f"returned {claims!r}"
        if what:
            outcomes["finding"] += 1
            key = what.split(": ")[0]
            seen = findings.get(key)
            if seen is None:
                findings[key] = Finding(what, token, case.labels)
            else:
                seen.count += 1
                if len(token) < len(seen.token):
                    seen.what, seen.token, seen.labels = what, token, case.labels
    elapsed = time.perf_counter() - started
    summary = f"token validator: {ITERATIONS} iterations in {elapsed:.1f} s (seed {SEED})"
    print(f"{summary}: {dict(outcomes)}")
    record_property("validator_iterations", ITERATIONS)
    record_property("validator_outcomes", dict(outcomes))
    assert outcomes["Claims"] > 0 and outcomes["InvalidToken"] > 0  # both sides were reached
    assert not findings, "\n".join([summary, *map(str, findings.values())])


# --- the route mapper fuzz target ---------------------------------------------------------

PREFIXES = ("/a", "/a/", "/x-", "/", "/b.")
SOURCE_PIECES = (
    *("/", "a", "-", "x/", "\\.", ".", ".*", "[^/]*", "(.*)", "(.*)", "(.*?)", "([^/]*)"),
    *("([^/]+)", "(\\d+)", "([a-z]*)", "(a|b)", "(x)?", "(?:/y)?", "(?i:ab)", "(\\.\\.)"),
    *("(%2e)?", "(;.*)?", "(?P<g>[^/]*)", "(.)", "(/?)"),
)
BROKEN_SOURCE = ("(", ")", "[", "[[", "*", "+?", "{2}", "\\", "(?P<", "(?P<g>a)(?P<g>b)")
TARGET_PIECES = ("$", "$", "$", "a", "b", "/", "-", "x/", "$/$", "x$")  # "$": a group reference
BROKEN_TARGET = ("..", ".", "%2e", "%41", "$9", "$$1", ";", "..;", "$", "\\", "/x/", "/http")


@st.composite
def route_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Route files that mostly load: a rare piece from the BROKEN lists makes one refused."""
    routes = []
    for i in range(draw(st.integers(1, 4))):
        pieces = draw(st.lists(st.sampled_from(SOURCE_PIECES), max_size=4))
        if draw(st.integers(0, 9)) == 0:
            pieces.append(draw(st.sampled_from(BROKEN_SOURCE)))
        source = (
            draw(st.sampled_from(["^", "^", "^", ""]))
            + draw(st.sampled_from(PREFIXES))
            + "".join(draw(st.permutations(pieces)))
            + draw(st.sampled_from(["$", "$", ""]))
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                groups = re.compile(source).groups
        except re.error:
            groups = 1
        refs = st.integers(0, groups).map(lambda n: f"${n}")
        parts = [
            "".join(draw(refs) if c == "$" else c for c in piece)
            for piece in draw(st.lists(st.sampled_from(TARGET_PIECES), max_size=3))
        ]
        target = TARGET_PREFIX + "".join(parts)
        if draw(st.integers(0, 9)) == 0:
            broken = draw(st.sampled_from(BROKEN_TARGET))
            target = broken + target if broken.startswith("/") else target + broken
        route: dict[str, Any] = {"name": f"r{i}", "source": source, "target": target}
        if draw(st.booleans()):
            route["methods"] = draw(st.lists(st.sampled_from(sorted(HTTP_METHODS)), min_size=1))
        routes.append(route)
    return {"routes": routes}


FUZZ_PATHS = st.builds(
    lambda lead, parts: lead + "".join(parts),
    st.sampled_from(PREFIXES),
    st.lists(
        st.sampled_from((*PATH_PIECES, *("x", "y", "1", "ab", "a/", "x-", "a", "/", "..") * 3)),
        max_size=8,
    ),
)


def test_route_mapper_fuzz(record_property: RecordProperty) -> None:
    tally: Counter[str] = Counter()

    @settings(
        max_examples=ROUTE_TABLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(
        route_specs(),
        st.lists(
            st.tuples(FUZZ_PATHS, st.sampled_from(sorted(HTTP_METHODS))), min_size=1, max_size=12
        ),
    )
    def mapping_stays_under_http(spec: dict[str, Any], requests: list[tuple[str, str]]) -> None:
        tally["tables"] += 1
        with warnings.catch_warnings(record=True) as caught:
            # re warns (FutureWarning) about sources like "[[" that may change meaning in a
            # later Python; a route file may hold one, so it is counted, not an error here.
            warnings.simplefilter("always", FutureWarning)
            try:
                table = parse_routes(spec)
            except ConfigError:
                tally["refused tables"] += 1
                return
            finally:
                tally["tables with a regex FutureWarning"] += bool(caught)
        for raw, method in requests:
            tally["paths"] += 1
            try:
                target = forwarded_path(table, raw, method)
            except ProxyError as exc:
                tally[type(exc).__name__] += 1
                continue
            tally["forwarded"] += 1
            assert target.startswith(TARGET_PREFIX), (spec, raw, target)
            assert normalise(target) == target, (spec, raw, target)
            if target != table_says(table, normalise(split_target(raw)[0]), method):
                tally["forwarded elsewhere than the template says"] += 1

    started = time.perf_counter()
    mapping_stays_under_http()
    elapsed = time.perf_counter() - started
    print(f"route mapper: {dict(tally)} in {elapsed:.1f} s")
    record_property("route_mapper_tally", dict(tally))
    assert tally["forwarded"] > 0 and tally["refused tables"] > 0
