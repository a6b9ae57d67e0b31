"""Properties of the pure stages (path, route table, bearer header, audience) and of the
CPI-token cache under concurrency.

Hypothesis explores the pure functions; the route property also runs, seeded, through the real
handler. The cache property is one seeded run against the emulators (random users, tokens, waves,
cancellations and XSUAA outages), since @given and pytest-aiohttp's async fixtures cannot share
an event loop. `database=None` keeps Hypothesis from writing an example database into the work
tree; `--hypothesis-show-statistics` shows the counts.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.auth import audience_matches, bearer_token
from proxy.dev import EmulatedXsuaa, cpi_token_of
from proxy.errors import (
    BadRequest,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    Unauthorized,
)
from proxy.paths import normalise, split_target
from proxy.routes import HTTP_METHODS, TARGET_PREFIX, RouteTable, map_request, parse_routes
from proxy.state import METRICS, PIPELINE
from tests.conftest import ROUTES, Iflow, MakeProxy, bearer, until

Client = TestClient[web.Request, web.Application]

PURE = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- 1. path normalisation ----------------------------------------------------------------

# Pieces a path is glued from: separators and dots in every spelling attackers use (encoded,
# double-encoded, Tomcat's ";", look-alike unicode dots raw and as UTF-8 escapes), plus plain
# data and the characters normalise must refuse.
DOT_LIKE = (
    "/",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%252e",
    "%252f",
    ";",
    "..;",
    ";x=1",
    "\u2024",
    "\uff0e",
    "%E2%80%A4",
    "%e2%80%a4",
    "%EF%BC%8E",
    "%c0%ae",
)
DATA = ("a", "b", "http", "cpi", "admin", "%41", "%25", "%20", "-", "~", "$1", "?")
REFUSED = ("%00", " ", "\\", "#", "\t", "\x7f", "%", "%zz", "%2", "\u00e9")
PATH_PIECES = DOT_LIKE + DATA + REFUSED


def glued(pieces: tuple[str, ...], *, leads: tuple[str, ...] = ("/", "//", "")) -> Any:
    return st.builds(
        lambda lead, parts: lead + "".join(parts),
        st.sampled_from(leads),
        st.lists(st.sampled_from(pieces), max_size=20),
    )


# An explicit alphabet: Hypothesis then needs no Unicode table cache in the work tree.
ANY_CHAR = "".join(map(chr, range(128))) + "\u00a0\u00e9\u2024\u3000\uff0e\U0001f600"
RAW_PATHS = st.one_of(glued(PATH_PIECES), st.text(ANY_CHAR, max_size=40))
ENCODED_DOT_SLASH_BACKSLASH = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def _segments_are_plain(path: str) -> bool:
    for segment in path.split("/"):
        if segment in (".", "..") or segment.split(";", 1)[0] in (".", ".."):
            return False
    return True


@PURE
@given(RAW_PATHS)
@example("/cpi/a/..;x/%2e%2e/b")
@example("/%2e%2e")
@example("/a/%252e%252e/%E2%80%A4%E2%80%A4/b")
def test_normalised_path_is_rooted_dot_free_escape_free_and_stable(raw: str) -> None:
    try:
        path = normalise(raw)
    except BadRequest:
        return
    assert path.startswith("/")
    assert _segments_are_plain(path), path
    assert ENCODED_DOT_SLASH_BACKSLASH.search(path) is None, path
    assert "\\" not in path
    assert normalise(path) == path


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, written as the RFC's input/output buffers (an independent model)."""
    data, out = path, ""
    while data:
        if data.startswith("../"):
            data = data[3:]
        elif data.startswith("./"):
            data = data[2:]
        elif data.startswith("/./"):
            data = "/" + data[3:]
        elif data == "/.":
            data = "/"
        elif data.startswith("/../") or data == "/..":
            data = "/" + data[4:]
            out = out[: max(out.rfind("/"), 0)]
        elif data in (".", ".."):
            data = ""
        else:
            end = data.find("/", 1)
            end = len(data) if end == -1 else end
            out, data = out + data[:end], data[end:]
    return out


_DECODED = {"%2e": ".", "%2E": ".", "%2f": "/", "%2F": "/"}
# Pieces whose meaning is known without running normalise: no ";" (Tomcat's rule is not the
# RFC's) and no bare "%" (which could fuse with the next piece into a new escape).
MODELLED = tuple(p for p in DOT_LIKE + DATA if ";" not in p and p not in ("%", "?"))


@PURE
@given(st.lists(st.sampled_from(MODELLED), max_size=20))
def test_normalise_agrees_with_rfc3986_on_the_decoded_path(pieces: list[str]) -> None:
    raw = "/" + "".join(pieces)
    try:
        path = normalise(raw)
    except BadRequest:
        return  # refusing (climbing above /, bad UTF-8) is always allowed
    decoded = "/" + "".join(_DECODED.get(p, p) for p in pieces)
    assert path == remove_dot_segments(decoded)


# --- 2. route mapping: the forwarded path is the route table's, under /http/ ---------------

ROUTE_FILE: dict[str, Any] = {
    "routes": [
        *ROUTES["routes"],
        # A source whose group starts mid-segment while the target puts it at a segment
        # start: "../" in the group can only be refused, never resolved.
        {"name": "orders", "source": "^/orders(.*)$", "target": "/http/orders/$1"},
        {
            "name": "swap",
            "source": "^/swap/([^/]*)/([^/]*)(/.*)?$",
            "target": "/http/swapped/$2/$1$3",
            "methods": ["GET", "POST"],
        },
    ]
}
TABLE = parse_routes(ROUTE_FILE).resolve("app!t1")
ROUTE_PREFIXES = ("/cpi/", "/tech/", "/ro/", "/dots", "/admin/", "/orders", "/swap/", "/http/", "/")
ROUTED_PATHS = glued(PATH_PIECES, leads=ROUTE_PREFIXES)
METHODS = st.sampled_from(sorted(HTTP_METHODS))


def forwarded_path(table: RouteTable, raw_path: str, method: str) -> str:
    """The handler's mapping (`routes.map_request`), for the path only."""
    return map_request(table, raw_path, method)[1]


def fill(template: str, found: re.Match[str]) -> str:
    """$n is the n-th group ($0 the whole match); a group that did not take part is empty."""
    return re.sub(r"\$(\d+)", lambda m: found.group(int(m[1])) or "", template)


def table_says(table: RouteTable, path: str, method: str) -> str | type[ProxyError]:
    """What the route file means for an already normalised path: the first route whose source
    matches and which allows the method, its template filled with the groups."""
    refused_method = False
    for route in table.routes:
        found = route.source.match(path)
        if found is None:
            continue
        if route.methods is not None and method not in route.methods:
            refused_method = True
            continue
        return fill(route.target, found)
    return MethodNotAllowed if refused_method else NotFound


def is_clean_target(target: str) -> bool:
    try:
        return target.startswith(TARGET_PREFIX) and normalise(target) == target
    except BadRequest:
        return False


@PURE
@given(ROUTED_PATHS, METHODS)
@example("/cpi/../admin/x", "GET")
@example("/orders../admin/x", "GET")
def test_forwarded_path_is_exactly_the_route_tables_and_stays_under_http(
    raw: str, method: str
) -> None:
    path = ""
    try:
        path = normalise(split_target(raw)[0])  # the query is not part of the routed path
    except BadRequest:
        expected: str | type[ProxyError] = BadRequest
    else:
        expected = table_says(TABLE, path, method)
        if isinstance(expected, str) and not is_clean_target(expected):
            # The groups carry a dot segment into the target: the request means something
            # other than the template, so the only honest answer is a refusal.
            expected = BadRequest
    try:
        actual: str | type[ProxyError] = forwarded_path(TABLE, raw, method)
    except ProxyError as exc:
        actual = type(exc)
    assert actual == expected, f"{raw!r} normalised to {path!r}"
    if isinstance(actual, str):
        assert actual.startswith(TARGET_PREFIX)


# What an HTTP client can put on the request line as it is (no space, #, ? or raw non-ASCII).
WIRE_PIECES = tuple(p for p in PATH_PIECES if p.isascii() and p.isprintable() and p not in " #?\\")


async def test_proxy_forwards_exactly_what_the_route_table_says(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    """The same property through the real handler, so a change to proxy_handler is seen here."""
    rng = random.Random(4242)
    proxy = await make_proxy(routes=ROUTE_FILE)
    token = xsuaa.mint_user_token("alice")
    paths = ["/orders../admin/x", "/dots./x", "/cpi/a/..%2fb", "/swap/a/../b"]
    for _ in range(150):
        pieces = [rng.choice(WIRE_PIECES) for _ in range(rng.randrange(8))]
        paths.append(rng.choice(ROUTE_PREFIXES) + "".join(pieces))
    calls = [(path, rng.choice(["GET", "POST", "DELETE"])) for path in paths]
    raw = aiohttp.ClientSession(base_url=proxy.make_url(""), connector=aiohttp.TCPConnector())

    async def send(seq: int, path: str, method: str) -> int:
        headers = {**bearer(token), "x-test-seq": str(seq)}
        url = URL(path, encoded=True)
        async with raw.request(method, url, headers=headers, data=b"x") as resp:
            return resp.status

    async with raw:
        statuses = await asyncio.gather(*(send(i, p, m) for i, (p, m) in enumerate(calls)))
    reached = {r.headers["x-test-seq"]: r.raw_path for r in iflow.runtime.requests}
    wrong = []
    for seq, ((path, method), status) in enumerate(zip(calls, statuses, strict=True)):
        try:
            says = table_says(TABLE, normalise(path), method)
        except BadRequest:
            says = BadRequest
        if isinstance(says, str) and not is_clean_target(says):
            says = BadRequest
        forwarded = reached.get(str(seq))
        if isinstance(says, str):
            ok = forwarded == says or (forwarded is None and status == 403)  # admin's scope
        else:
            ok = forwarded is None and status == says.status
        if not ok:
            wrong.append(f"{method} {path} -> {status}, CPI got {forwarded!r}; table says {says}")
    assert wrong == [], "\n".join(wrong)


# --- 3. the Authorization header ---------------------------------------------------------

SCHEMES = ("Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Bearerx", "Bear", "", "Bearer\t")
GAPS = ("", " ", "  ", "\t", " \t", "\u00a0", "\n")
TOKEN_TEXT = st.one_of(
    st.sampled_from(("", " ", "abc", "a.b.c", "x y", "\t", "\u3000", "tok\u00a0")),
    st.text(ANY_CHAR, max_size=12),
)
HEADER_VALUE = st.one_of(
    st.builds(
        lambda lead, scheme, gap, token, tail: lead + scheme + gap + token + tail,
        st.sampled_from(GAPS),
        st.sampled_from(SCHEMES),
        st.sampled_from(GAPS),
        TOKEN_TEXT,
        st.sampled_from(GAPS),
    ),
    st.text(ANY_CHAR, max_size=20),
)


def expected_bearer(values: list[str]) -> str | type[ProxyError]:
    """RFC 6750: one header, scheme "bearer" in any ASCII case, one space, a non-blank token."""
    if not values:
        return Unauthorized
    if len(values) > 1:
        return InvalidToken
    value = values[0].strip()
    scheme, rest = value[:6], value[6:]
    if not (scheme.isascii() and scheme.lower() == "bearer" and rest.startswith(" ")):
        return Unauthorized
    return rest.strip() or Unauthorized


@PURE
@given(st.lists(HEADER_VALUE, max_size=3))
@example(["Bearer abc"])
@example(["bEaReR  abc  "])
@example(["Bearer abc", "Bearer abc"])
@example(["Bearer\u00a0abc"])
def test_bearer_token_only_from_exactly_one_bearer_header(values: list[str]) -> None:
    try:
        actual: str | type[ProxyError] = bearer_token(values)
    except (Unauthorized, InvalidToken) as exc:
        actual = type(exc)
    assert actual == expected_bearer(values)
    if isinstance(actual, str):
        assert actual and actual == actual.strip()


# --- 4. the audience rule (xssec 4) --------------------------------------------------------

CLIENTID = "sb-cpitexxsappname!t4711"
XSAPPNAME = "cpitexxsappname!t4711"


def _near(name: str) -> list[str]:
    """Strings that equal, extend, or only resemble `name`."""
    return [
        name,
        f"{name}.texfrontendscope",
        f"{name}.",
        f"{name}evil",
        f"evil.{name}",
        f"{name}!evil",
        name[:-1],
        name.upper(),
        f" {name}",
        f"{name}.a.b",
    ]


AUD_WORDS = st.sampled_from([*_near(CLIENTID), *_near(XSAPPNAME), "", "uaa", "openid", "evil"])
SCOPE_WORDS = st.one_of(
    AUD_WORDS, AUD_WORDS.map(lambda s: s + ".Read"), st.sampled_from(["uaa.user", "openid"])
)
MISSING = object()


@st.composite
def well_typed_claims(draw: st.DrawFn) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    aud = draw(st.sampled_from(["missing", "none", "str", "list"]))
    if aud == "none":
        claims["aud"] = None
    elif aud == "str":
        claims["aud"] = draw(AUD_WORDS)
    elif aud == "list":
        claims["aud"] = draw(st.lists(AUD_WORDS, max_size=4))
    scope = draw(st.sampled_from(["missing", "str", "list"]))
    if scope == "str":
        claims["scope"] = " ".join(draw(st.lists(SCOPE_WORDS, max_size=4)))
    elif scope == "list":
        claims["scope"] = draw(st.lists(SCOPE_WORDS, max_size=4))
    if draw(st.booleans()):
        claims["cid"] = draw(AUD_WORDS)
    return claims


def expected_audience(claims: Mapping[str, Any], clientid: str, xsappname: str) -> bool:
    """xssec 4: aud (or, when it is absent or empty, the prefix before the first dot of each
    dotted scope) plus cid; a candidate names us if it is a name or `<name>.` something."""
    aud = claims.get("aud")
    candidates = [aud] if isinstance(aud, str) else [a for a in aud or [] if isinstance(a, str)]
    if not candidates:
        scope = claims.get("scope")
        scopes = scope.split() if isinstance(scope, str) else scope or []
        candidates = [s.split(".", 1)[0] for s in scopes if isinstance(s, str) and "." in s]
    if isinstance(claims.get("cid"), str):
        candidates.append(claims["cid"])
    return any(
        c == name or (c.startswith(name) and c[len(name) : len(name) + 1] == ".")
        for c in candidates
        for name in (clientid, xsappname)
    )


@PURE
@given(well_typed_claims())
@example({"aud": [f"{XSAPPNAME}evil"], "cid": f"evil.{CLIENTID}"})
@example({"aud": [], "scope": [f"{XSAPPNAME}.texfrontendscope"]})
@example({"scope": f"evil.{XSAPPNAME}.x {XSAPPNAME}evil.y"})
def test_audience_accepts_exactly_our_names_and_their_dotted_extensions(
    claims: dict[str, Any],
) -> None:
    assert audience_matches(claims, CLIENTID, XSAPPNAME) == expected_audience(
        claims, CLIENTID, XSAPPNAME
    )


ODD_VALUES = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.dictionaries(AUD_WORDS, st.integers(), max_size=2),
    st.lists(st.one_of(AUD_WORDS, st.integers(), st.none(), st.lists(AUD_WORDS, max_size=2))),
    AUD_WORDS,
)


@PURE
@given(
    st.fixed_dictionaries({}, optional={"aud": ODD_VALUES, "scope": ODD_VALUES, "cid": ODD_VALUES})
)
@example({"aud": 5})
@example({"aud": {CLIENTID: 1}})
def test_audience_rule_survives_mistyped_claims_and_only_trusts_strings(
    claims: dict[str, Any],
) -> None:
    """A signed token is still JSON from elsewhere: odd types must neither crash the rule
    (a 500 instead of a 401) nor be read as an audience (dict keys, nested lists)."""
    accepted = audience_matches(claims, CLIENTID, XSAPPNAME)
    assert isinstance(accepted, bool)
    strings = {k: v for k, v in claims.items() if isinstance(v, str | list)}
    if accepted:
        assert expected_audience(strings, CLIENTID, XSAPPNAME), claims


# --- 5. the CPI-token cache under concurrency, cancellation and XSUAA outages --------------


@dataclass(frozen=True)
class Sender:
    user: str
    label: str  # one per user token; travels in the token (family_name) into the CPI token
    token: str


@dataclass(frozen=True)
class Call:
    seq: int
    sender: Sender

    @property
    def body(self) -> bytes:
        return f"{self.sender.label}/{self.seq}".encode()


USERS = 60
REQUESTS = 600


def _senders(rng: random.Random, xsuaa: EmulatedXsuaa) -> list[Sender]:
    senders = []
    for i in range(USERS):
        user = f"user{i:02d}"
        for n in range(2 if rng.random() < 0.35 else 1):
            # Short-lived tokens cache their CPI token only for their own remaining life; 20 s
            # outlives this test, so XSUAA never sees an expired assertion here.
            expires_in = rng.randint(20, 40) if rng.random() < 0.3 else 3600
            label = f"{user}#{n}"
            token = xsuaa.mint_user_token(
                user, expires_in=expires_in, claims={"family_name": label}
            )
            senders.append(Sender(user, label, token))
    return senders


def _waves(rng: random.Random, calls: list[Call]) -> list[list[Call]]:
    waves, start = [], 0
    while start < len(calls):
        size = rng.randint(40, 160)
        waves.append(calls[start : start + size])
        start += size
    return waves


async def test_concurrent_users_never_get_each_others_cpi_token(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    rng = random.Random(20240611)
    proxy = await make_proxy()
    senders = _senders(rng, xsuaa)
    chosen = senders + [rng.choice(senders) for _ in range(REQUESTS - len(senders))]
    rng.shuffle(chosen)
    waves = _waves(rng, [Call(seq, sender) for seq, sender in enumerate(chosen)])
    # Never the first wave, always the second (a cold cache), and later ones (a warm cache,
    # which must keep serving through the outage).
    faulty = {1, *rng.sample(range(2, len(waves)), k=max(1, len(waves) // 4))}
    exchanger = proxy.app[PIPELINE].exchanger
    metrics = proxy.app[METRICS]
    tally: Counter[str] = Counter()
    failures: list[str] = []

    def quiet() -> bool:
        # A flight whose every waiter was cancelled keeps running (it fills the cache for the
        # next caller); the next wave must not join one that began under the other fault mode.
        flights = exchanger._flights._inflight  # no public view of waiter-less flights
        return metrics.in_flight.value == 0 and exchanger.waiting == 0 and not flights

    connector = aiohttp.TCPConnector(limit=0)  # the default pool of 100 would serialise waves
    async with aiohttp.ClientSession(base_url=proxy.make_url(""), connector=connector) as client:

        async def send(call: Call) -> tuple[int, str, bytes]:
            headers = {
                **bearer(call.sender.token),
                "x-test-user": call.sender.user,
                "x-test-token": call.sender.label,
            }
            async with client.post("/cpi/echo", data=call.body, headers=headers) as resp:
                return resp.status, resp.headers.get("x-cpi-subject", ""), await resp.read()

        for index, wave in enumerate(waves):
            fault = index in faulty
            xsuaa.token_fault = "unavailable" if fault else None
            tasks = [asyncio.ensure_future(send(call)) for call in wave]
            cancel_at = {i: rng.randint(0, 60) for i in range(len(wave)) if rng.random() < 0.12}
            for step in range(61):
                for i, at in cancel_at.items():
                    if at == step:
                        tasks[i].cancel()
                await asyncio.sleep(0)  # one loop iteration: requests advance between cancels
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            for call, task, outcome in zip(wave, tasks, outcomes, strict=True):
                if task.cancelled():
                    tally["cancelled"] += 1
                    continue
                if isinstance(outcome, BaseException):
                    failures.append(f"{call}: {outcome!r}")
                    continue
                status, subject, body = outcome
                tally[f"{status} in {'fault' if fault else 'normal'} waves"] += 1
                if status == 200:
                    if (subject, body) != (call.sender.user, call.body):
                        failures.append(f"{call}: 200 as {subject!r} with body {body!r}")
                elif not (fault and status == 503 and b"token_exchange_unavailable" in body):
                    failures.append(f"{call}: {status} {body!r} (fault wave: {fault})")
            await until(quiet)
            xsuaa.token_fault = None

    for record in iflow.runtime.requests:
        cpi = jwt.decode(cpi_token_of(record), options={"verify_signature": False})
        sent_as = (record.headers.get("x-test-user"), record.headers.get("x-test-token"))
        carried = (cpi.get("user_name"), cpi.get("family_name"))
        if carried != sent_as or record.subject != sent_as[0]:
            failures.append(f"CPI saw {sent_as} with a CPI token of {cpi.get('family_name')!r}")
    reached = len(iflow.runtime.requests)  # more than the 200s: some were cancelled in flight
    print(
        f"cache isolation: {len(waves)} waves, faulty {sorted(faulty)}, {dict(tally)}, {reached=}"
    )
    assert failures == []
    assert set(tally) == {
        "200 in normal waves",
        "200 in fault waves",  # a cached CPI token outlives an XSUAA outage
        "503 in fault waves",
        "cancelled",
    }, tally
    assert reached >= tally["200 in normal waves"] + tally["200 in fault waves"]
