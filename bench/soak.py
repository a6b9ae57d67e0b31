"""`make soak`: a bounded soak of a real `cpi-proxy serve` under steady, mixed, faulty traffic.

The emulated XSUAA and iFlow runtime run over HTTPS in this process; the proxy is a subprocess
(pinned to core 0 when there are 2+ cores), so the RSS and FDs sampled are its own. Every answer
is checked against what its request should get, and one carrying another request's identity
(x-cpi-subject, x-cpi-path, correlation id, echoed body) fails the soak. So do leaks: RSS growth
after the warm-up beyond 20 MiB, more than 20 FDs or 10 asyncio tasks more once idle than before
the load, requests left in flight;
and more than one exchange or CSRF fetch per user token, ERROR lines in the proxy's log, a crash,
or an unclean exit on SIGTERM. Exit code 0: PASS, 1: FAIL.

    python bench/soak.py [--minutes 5] [--rate 200] [--users 200] [--seed 1] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.dev import EmulatedIflowRuntime, EmulatedXsuaa, make_dev_ca

MIB = 1024 * 1024
RSS_LIMIT_MIB, FD_LIMIT, TASK_LIMIT, IN_FLIGHT_LIMIT = 20.0, 20, 10, 2
SAMPLE_EVERY, REMINTS_PER_S = 5.0, 0.5
LEEWAY = 60.0  # the proxy accepts a user token this long past its exp
PATTERN = bytes(range(256)) * (8 * MIB // 256)  # byte i of an emulator download is i % 256
OUTAGE = "unavailable"  # the emulated XSUAA's fault: 503 temporarily_unavailable
FAULT_OUTCOME = {"status500": "500", "truncated": "200/payload", "cancel": "200/cancel"}
SCOPE = "$XSAPPNAME.texfrontendscope"
ROUTES = {"routes": [
    {"name": "cpi", "source": "^/cpi/(.*)$", "target": "/http/$1", "scope": SCOPE, "csrf": "auto"},
    {"name": "tech", "source": "^/tech/(.*)$", "target": "/http/$1", "scope": SCOPE,
     "grant": "client-credentials"},
    {"name": "role", "source": "^/role/(.*)$", "target": "/http/$1", "scope": SCOPE,
     "cpiRole": "cpitex.Read"},
]}  # fmt: skip


@dataclass(frozen=True)
class Op:
    label: str  # "METHOD /path [what]"
    body: str = ""  # "", small, 100KiB, 2MiB (over the replay limit) or chunked
    special: str = ""  # download, status500, truncated, cancel or revoke

    @property
    def method(self) -> str:
        return self.label.split()[0]

    @property
    def path(self) -> str:  # behind the proxy, without the leading slash
        return self.label.split()[1][1:]

    @property
    def route(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def replayable(self) -> bool:
        return self.body not in ("2MiB", "chunked")


OPS: tuple[tuple[float, Op], ...] = (
    (20, Op("GET /cpi/echo")), (20, Op("POST /cpi/echo small", "small")),
    (5, Op("POST /cpi/echo 100KiB", "100KiB")), (1, Op("POST /cpi/echo 2MiB", "2MiB")),
    (1, Op("POST /cpi/_emu/sink chunked", "chunked")),
    (4, Op("GET /cpi/csrf/echo")), (10, Op("POST /cpi/csrf/echo small", "small")),
    (2, Op("POST /cpi/csrf/echo 100KiB", "100KiB")), (0.5, Op("POST /cpi/csrf/echo 2MiB", "2MiB")),
    (0.5, Op("POST /cpi/csrf/echo chunked", "chunked")),
    (6, Op("GET /tech/echo")), (6, Op("POST /tech/echo small", "small")),
    (4, Op("GET /role/echo")), (4, Op("POST /role/echo small", "small")),
    (1, Op("GET /cpi/_emu/download 1-8MiB", special="download")),
    (0.5, Op("GET /cpi/_emu/status/500", special="status500")),
    (0.5, Op("GET /cpi/_emu/truncated", special="truncated")),
    (0.5, Op("GET /cpi/_emu/download client-cancels", special="cancel")),
    (0.3, Op("POST /cpi/csrf/echo small revoked-at-CPI", "small", "revoke")),
)  # fmt: skip


@dataclass
class Account:
    name: str
    kind: str  # user, frontend (lacks the CPI role), revoke (revocation targets), short-lived
    token: str = field(default="", repr=False)
    exp: float = 0.0  # epoch seconds


@dataclass(frozen=True)
class Sent:
    """One request as sent, with the outcomes acceptable for it (-> JSON `error` code)."""

    op: Op
    acc: Account
    rid: int
    query: str
    body: bytes
    size: int  # of a download
    ok: dict[str, str | None]


@dataclass(frozen=True)
class Sample:
    t: float
    rss_mib: float
    fds: int
    in_flight: int
    tasks: int  # asyncio tasks alive in the proxy, from its /metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_error(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload"
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


def fields(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body) if body[:1] == b"{" else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)  # noqa: S311 - traffic shape, not secrets
        self.blob = self.rng.randbytes(2 * MIB)
        self.ca = make_dev_ca()
        self.xsuaa = EmulatedXsuaa()
        self.runtime = EmulatedIflowRuntime(self.xsuaa)
        self.runtime.csrf_paths = ("/http/csrf/",)
        self.runners: list[web.AppRunner] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{free_port()}"
        self.accounts: dict[str, list[Account]] = {}
        self.warm: set[str] = set()  # hashes of user tokens the proxy has a CPI token for
        self.tech_warm = False
        self.revoked_at: dict[str, float] = {}
        self.outages: list[tuple[float, float]] = []  # monotonic (start, end) of XSUAA 503s
        self.by_op: Counter[tuple[str, str]] = Counter()  # (op label, outcome)
        self.by_user: Counter[tuple[str, str]] = Counter()  # (user kind, outcome)
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self.tokens_used: dict[str, set[str]] = {"jwt": set(), "csrf": set()}
        self.latency: list[tuple[float, float]] = []
        self.samples: list[Sample] = []
        self.sent = self.shed = self.remints = self.revocations = 0
        self.active: set[asyncio.Task[None]] = set()
        self.started = 0.0
        # The emulators log a traceback for each answer the proxy breaks off (client cancels).
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    # --- the world: emulators over HTTPS in this process, the proxy a pinned subprocess ------

    async def serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ca.server_context()).start()
        self.runners.append(runner)
        return f"https://localhost:{runner.addresses[0][1]}"

    async def start(self) -> None:
        self.xsuaa.base_url = await self.serve(self.xsuaa.app())
        cpi_url = await self.serve(self.runtime.app())
        (self.work / "routes.json").write_text(json.dumps(ROUTES))
        self.spawn({
            **os.environ,
            "SSL_CERT_FILE": str(self.ca.write_ca(self.work)),
            "LOG_LEVEL": "WARNING",
            "VCAP_SERVICES": json.dumps(self.xsuaa.vcap_services(cpi_url)),
            "CPI_PROXY_CONFIG": str(self.work / "routes.json"),
            "PORT": self.base.rsplit(":", 1)[1],
        })  # fmt: skip
        n, front = self.args.users, max(1, self.args.users // 10)
        self.accounts = {
            "user": [self.mint(Account(f"user{i:04d}", "user")) for i in range(n - front)],
            "frontend": [self.mint(Account(f"front{i:03d}", "frontend")) for i in range(front)],
            "revoke": [self.mint(Account(f"revoke{i:02d}", "revoke")) for i in range(20)],
            "short-lived": [self.mint(Account(f"short{i}", "short-lived")) for i in range(5)],
        }
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                assert self.alive(), "the proxy exited at start"
                try:
                    async with session.get(f"{self.base}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("the proxy did not become ready within 30 s")

    def spawn(self, env: dict[str, str]) -> None:
        """The proxy on core 0, this process (load and emulators) on the other cores."""
        cores = os.cpu_count() or 1
        pin = ["taskset", "-c", "0"] if cores > 1 and shutil.which("taskset") else []
        if pin:
            os.sched_setaffinity(0, set(range(1, cores)))
        command = [*pin, sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
        with (self.work / "proxy.log").open("wb") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603

    def mint(self, acc: Account) -> Account:
        """A (new) token; short-lived ones expire a quarter to half way through the run."""
        life = max(20, int(self.rng.uniform(0.25, 0.5) * self.args.minutes * 60))
        acc.token = self.xsuaa.mint_user_token(
            acc.name,
            role_collections=("FrontendOnly",) if acc.kind == "frontend" else ("CpiTexUser",),
            expires_in=life if acc.kind == "short-lived" else 3600,
        )
        acc.exp = float(jwt.decode(acc.token, options={"verify_signature": False})["exp"])
        return acc

    # --- traffic and its checks --------------------------------------------------------------

    async def drive(self, session: aiohttp.ClientSession, seconds: float) -> None:
        """Open loop: requests leave on a fixed tick whatever the answers do; a tick that finds
        `concurrency` requests open is shed (counted), not queued."""
        weights, ops = [w for w, _ in OPS], [op for _, op in OPS]
        issued = 0
        while (elapsed := time.monotonic() - self.started) < seconds and self.alive():
            for _ in range(int(elapsed * self.args.rate) - issued):
                issued += 1
                if self.rng.random() < REMINTS_PER_S / self.args.rate:
                    self.mint(self.rng.choice(self.accounts[self.rng.choice(["user", "frontend"])]))
                    self.remints += 1
                if len(self.active) >= self.args.concurrency:
                    self.shed += 1
                    continue
                self.sent += 1
                op = self.rng.choices(ops, weights)[0]
                task = asyncio.create_task(self.request(session, op, self.pick(op), issued))
                self.active.add(task)
                task.add_done_callback(self.active.discard)
            await asyncio.sleep(1 / self.args.rate)

    def pick(self, op: Op) -> Account:
        roll, targets = self.rng.random(), self.accounts["revoke"]
        if op.special == "revoke":  # the least recently revoked: a revocation racing the renewal
            # after the previous one would refuse the token XSUAA just issued, a final 401
            acc = min(targets, key=lambda acc: self.revoked_at.get(acc.name, -math.inf))
            self.revoked_at[acc.name] = time.monotonic()
            return acc
        if op.replayable and not op.special and roll < 0.05:
            return self.rng.choice(targets)  # whose bodies can be sent twice
        if roll < 0.08:
            return self.rng.choice(self.accounts["short-lived"])
        return self.rng.choice(self.accounts["frontend" if roll < 0.18 else "user"])

    def expect(self, op: Op, acc: Account) -> dict[str, str | None]:
        now = time.time()
        if acc.kind == "short-lived" and now > acc.exp + LEEWAY + 5:
            return {"401": "invalid_token"}
        ok: dict[str, str | None] = {"200": None}
        if acc.kind == "frontend" and op.route in ("cpi", "role"):
            ok = {"403": "cpi_forbidden" if op.route == "cpi" else "missing_cpi_role"}
        elif op.special in FAULT_OUTCOME:
            ok = {FAULT_OUTCOME[op.special]: None}
        elif op.path == "cpi/csrf/echo" and not op.replayable:
            ok["403"] = "csrf_required"  # until this user's CSRF token is cached
        if acc.kind == "short-lived" and now > acc.exp - 5:
            ok["401"] = "invalid_token"  # expiring: exchanged again, and XSUAA refuses
        return ok

    def is_cold(self, op: Op, acc: Account, key: str, now: float) -> bool:
        """Whether this request may need a token from XSUAA (and so meet an outage)."""
        if op.route == "tech":
            return not self.tech_warm
        recently_revoked = now - self.revoked_at.get(acc.name, -math.inf) < 30
        return key not in self.warm or recently_revoked or time.time() > acc.exp - 5

    async def request(self, session: aiohttp.ClientSession, op: Op, acc: Account, rid: int) -> None:
        key, began = hashlib.sha256(acc.token.encode()).hexdigest(), time.monotonic()
        if op.special == "revoke":
            self.runtime.revoke_subject_tokens(acc.name)  # CPI now refuses the cached CPI token
            self.revocations += 1
        if op.route != "tech":
            self.tokens_used["jwt"].add(key)
        if op.path == "cpi/csrf/echo" and op.method == "POST":
            self.tokens_used["csrf"].add(key)
        cold = self.is_cold(op, acc, key, began)
        query = f"u={acc.name}&r={rid}"
        size = self.rng.randint(1, 8) * MIB if op.special == "download" else 8 * MIB
        if op.special in ("download", "cancel"):
            query = f"bytes={size}&{query}"
        elif op.special == "truncated" and self.rng.random() < 0.5:
            query = f"chunked&{query}"
        data, body = self.body(op, f"{acc.name} {rid}\n".encode())
        sent = Sent(op, acc, rid, query, body, size, self.expect(op, acc))
        headers = {"Authorization": f"Bearer {acc.token}", "x-correlationid": f"soak-{rid}"}
        if op.body:
            headers["Content-Type"] = "application/octet-stream"
        got, answer, status = b"", None, 0
        try:
            url = f"{self.base}/{op.path}?{query}"
            async with session.request(op.method, url, data=data, headers=headers) as resp:
                status, answer = resp.status, resp.headers
                try:
                    if op.special == "cancel" and status == 200:
                        await resp.content.readexactly(MIB)
                        resp.close()  # the client goes away mid-download
                        outcome = "200/cancel"
                    else:
                        got, outcome = await resp.read(), str(status)
                except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    outcome = f"{status}/{client_error(exc)}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = client_error(exc)
        done = time.monotonic()
        if status in (200, 403, 500):  # each means the proxy got (and cached) a CPI token
            if op.route == "tech":
                self.tech_warm = True
            else:
                self.warm.add(key)
        if cold and any(start < done and end > began for start, end in self.outages):
            sent.ok["503"] = "token_exchange_unavailable"  # a cold exchange met the outage
        self.by_op[op.label, outcome] += 1
        self.by_user[acc.kind, outcome] += 1
        if outcome == "200" and not op.body and not op.special:
            self.latency.append((began - self.started, done - began))
        problem = self.check(sent, outcome, answer, got)
        if problem:
            self.errors[problem[0]] += 1
            if len(self.examples) < 12:
                self.examples.append(f"{problem[0]}: {op.label} [{acc.kind}] -> {problem[1]}")

    def body(self, op: Op, marker: bytes) -> tuple[bytes | AsyncIterator[bytes] | None, bytes]:
        """What to send, and the bytes that makes; each body starts with user and request."""
        if op.body == "chunked":
            parts = [marker, *(self.blob[i : i + 65536] for i in range(0, 4 * 65536, 65536))]

            async def stream() -> AsyncIterator[bytes]:
                for part in parts:
                    yield part
                    await asyncio.sleep(0.005)

            return stream(), b"".join(parts)
        size = {"": 0, "small": len(marker), "100KiB": 100 * 1024, "2MiB": 2 * MIB}[op.body]
        data = (marker + self.blob)[:size]
        return (data if op.body else None), data

    def check(
        self, sent: Sent, outcome: str, headers: CIMultiDictProxy[str] | None, got: bytes
    ) -> tuple[str, str] | None:
        """Another request's identity in the answer, else an unexpected outcome or body."""
        op, ok, error = sent.op, sent.ok, fields(got).get("error")
        if headers is not None:
            subject = self.xsuaa.cpi.client_id if op.route == "tech" else sent.acc.name
            cpi_path = f"/http/{op.path.split('/', 1)[1]}?{sent.query}"
            if headers.get("x-cpi-subject", subject) != subject:
                return "cross-user", "x-cpi-subject is another user's"
            if headers.get("x-cpi-path", cpi_path) != cpi_path:
                return "cross-user", "x-cpi-path is another request's"
            if headers.get("x-correlationid") != f"soak-{sent.rid}":
                return "cross-user", "x-correlationid is another request's"
        if outcome not in ok:
            said = f" {error}: {str(fields(got).get('error_description'))[:160]}" if error else ""
            kind = "unexpected status" if outcome.isdigit() else "client error"
            return kind, f"{outcome}{said} (expected {'/'.join(ok)})"
        if ok[outcome] is not None and error != ok[outcome]:
            return "unexpected status", f"{outcome} {error} (expected {ok[outcome]})"
        if outcome != "200":
            return None
        if op.path.endswith("echo") and got != sent.body:
            owner = got.split(b" ", 1)[0].decode(errors="replace")
            kind = "cross-user" if owner != sent.acc.name else "bad body"
            return kind, f"echo of {len(got)} bytes for {len(sent.body)}"
        if op.special == "download" and memoryview(PATTERN)[: sent.size] != got:
            return "bad body", f"download of {len(got)} bytes for {sent.size}, or wrong bytes"
        sink = {"bytes": len(sent.body), "sha256": hashlib.sha256(sent.body).hexdigest()}
        if op.path.endswith("sink") and fields(got) != sink:
            return "bad body", "the sink saw other bytes"
        return None

    # --- watching the proxy, and XSUAA outages -----------------------------------------------

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd")) if self.proc else 0

    async def sample(self, session: aiohttp.ClientSession) -> Sample | None:
        if not self.alive() or self.proc is None:
            return None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()  # noqa: ASYNC240 - procfs
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        text = await self.metrics(session)
        in_flight, tasks = metric(text, "requests_in_flight"), metric(text, "asyncio_tasks")
        return Sample(time.monotonic() - self.started, rss, self.fds(), int(in_flight), int(tasks))

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"{self.base}/metrics") as resp:
            return await resp.text()

    async def observe(self, session: aiohttp.ClientSession) -> None:
        while (sample := await self.sample(session)) is not None:
            self.samples.append(sample)
            self.runtime.requests.clear()  # the runtime records every request it serves
            await asyncio.sleep(SAMPLE_EVERY)

    async def outage_loop(self) -> None:
        """Every 40-70 s, XSUAA's token endpoint answers 503 for 3-5 s."""
        while True:
            await asyncio.sleep(self.rng.uniform(40, 70))
            self.outages.append((time.monotonic(), math.inf))
            self.xsuaa.token_fault = OUTAGE
            try:
                await asyncio.sleep(self.rng.uniform(3, 5))
            finally:
                self.xsuaa.token_fault = None
                self.outages[-1] = (self.outages[-1][0], time.monotonic())

    # --- the run and its verdict -------------------------------------------------------------

    async def run(self) -> bool:
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        timeout = aiohttp.ClientTimeout(total=120, sock_read=30)
        async with aiohttp.ClientSession() as ops:
            idle_before = self.fds()
            tasks_before = int(metric(await self.metrics(ops), "asyncio_tasks"))
            self.started = time.monotonic()
            observer = asyncio.create_task(self.observe(ops))
            outages = asyncio.create_task(self.outage_loop())
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await self.drive(session, self.args.minutes * 60)
                load_s = time.monotonic() - self.started
                outages.cancel()
                if self.active:
                    _, stuck = await asyncio.wait(self.active, timeout=60)
                    for task in stuck:
                        task.cancel()
                    self.errors["client error"] += len(stuck)
            observer.cancel()
            await asyncio.sleep(1)
            drained = await self.sample(ops)
            for _ in range(40):  # the proxy's pooled connections to CPI idle out after 15 s
                if not self.alive() or self.fds() <= idle_before + 2:
                    break
                await asyncio.sleep(1)
            final = await self.sample(ops)
            text = await self.metrics(ops) if self.alive() else ""
        crashed = not self.alive()
        exit_code = None
        if self.proc is not None and not crashed:
            self.proc.send_signal(signal.SIGTERM)
            try:
                exit_code = await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                exit_code = None  # killed below
        idle = (idle_before, tasks_before)
        return self.report(load_s, idle, drained, final, text, crashed, exit_code)

    def report(
        self, load_s: float, idle: tuple[int, int], drained: Sample | None, final: Sample | None,
        text: str, crashed: bool, exit_code: int | None,
    ) -> bool:  # fmt: skip
        a, fails = self.args, []
        idle_before, tasks_before = idle
        warmup = min(60.0, a.minutes * 60 / 5)
        print(f"\ncpi-proxy soak: {load_s:.0f} s of load (the first {warmup:.0f} s warm-up) at"
              f" {a.rate} req/s, {a.users} users + 20 revocation targets + 5 short-lived tokens,"
              f" seed {a.seed}, at most {a.concurrency} open requests\nrequests: {self.sent} sent"
              f" ({self.sent / load_s:.1f}/s), {self.shed} ticks shed at the concurrency limit,"
              f" {self.remints} tokens re-minted\nrequests by kind and outcome (status, or"
              " status/client error), then by user kind:")  # fmt: skip
        for counts, labels in (
            (self.by_op, [op.label for _, op in OPS]),
            (self.by_user, [*self.accounts]),
        ):
            for label in labels:
                row = {o: n for (k, o), n in sorted(counts.items()) if k == label}
                outcomes = "  ".join(f"{o}: {n}" for o, n in row.items())
                print(f"  {label:42} {sum(row.values()):6}  {outcomes}")
        kinds = ("unexpected status", "cross-user", "bad body", "client error")
        print("errors: " + ", ".join(f"{k} {self.errors[k]}" for k in kinds))
        print("".join(f"  {example}\n" for example in self.examples), end="")
        down = sum(min(end, time.monotonic()) - start for start, end in self.outages)
        print(f"faults: XSUAA token endpoint 503 in {len(self.outages)} windows ({down:.1f} s);"
              f" CPI refused {self.runtime.revoked_hits} revoked CPI tokens (and the proxy renewed"
              " them); CPI 500s, truncations and client cancels as above")  # fmt: skip
        seen = sum(n for (_, outcome), n in self.by_op.items() if outcome[0] == "5")
        fives = re.findall(r'^cpi_proxy_requests_total{.*"5xx"} (\S+)$', text, re.M)
        print(f"5xx answers: clients saw {seen}, the proxy counts {sum(map(float, fives)):.0f}")
        pattern = r'^cpi_proxy_token_exchanges_total\{grant="([^"]+)",outcome="([^"]+)"\} (\S+)$'
        exchanges = {(g, o): int(float(v)) for g, o, v in re.findall(pattern, text, re.M)}
        outcomes = ", ".join(f"{g} {o} {n}" for (g, o), n in sorted(exchanges.items()))
        print(f"exchanges: XSUAA saw {dict(self.xsuaa.token_requests)}; the proxy: {outcomes}")
        revocations = self.revocations
        for what, done, bound in (
            ("jwt-bearer exchanges", exchanges.get(("jwt-bearer", "success"), 0),
             len(self.tokens_used["jwt"]) + revocations),
            ("CSRF fetches", self.runtime.csrf_fetches,
             len(self.tokens_used["csrf"]) + revocations),
        ):  # fmt: skip
            print(f"  {done} {what}; at most one per user token + one per revocation: {bound}")
            if done > bound:
                fails.append(f"{done} {what}, more than one per token ({bound})")
        mid = (warmup + load_s) / 2
        for name, lo, hi in (("warm-up end to middle", warmup, mid), ("middle to end", mid, 1e9)):
            times = [d * 1000 for t, d in self.latency if lo <= t < hi]
            q = statistics.quantiles(times, n=100) if len(times) > 1 else [math.nan] * 99
            print(f"latency of bodiless 200s, {name}: p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms")
        # Medians over a window (a minute, less in short runs): one sample may catch a burst of
        # large bodies in flight, and RSS is meant to show what stays.
        span = min(60.0, (load_s - warmup) / 3)
        early = [s.rss_mib for s in self.samples if warmup <= s.t < warmup + span]
        late = [s.rss_mib for s in self.samples if load_s - span <= s.t <= load_s]
        if not early or not late or drained is None or final is None:
            fails.append("too few samples of the proxy process (did it die?)")
        else:
            rss, fds = [s.rss_mib for s in self.samples], [s.fds for s in self.samples]
            base = statistics.median(early)
            rss_growth = statistics.median(late) - base
            fd_growth, task_growth = final.fds - idle_before, final.tasks - tasks_before
            print(f"proxy RSS MiB: first {rss[0]:.1f}, last {final.rss_mib:.1f}, max"
                  f" {max(rss):.1f}; median {base:.1f} in the {span:.0f} s after the warm-up,"
                  f" {base + rss_growth:.1f} in the last {span:.0f} s of load -> growth"
                  f" {rss_growth:+.1f} (limit {RSS_LIMIT_MIB:.0f})\nproxy FDs: first"
                  f" {fds[0]}, last {final.fds}, max {max(fds)}; idle {idle_before} before the"
                  f" load, {final.fds} after -> growth {fd_growth:+d} (limit {FD_LIMIT})\n"
                  f"proxy asyncio tasks: max {max(s.tasks for s in self.samples)} sampled; idle"
                  f" {tasks_before} before the load, {final.tasks} after -> growth"
                  f" {task_growth:+d} (limit {TASK_LIMIT}; the /metrics scrape has its own)\n"
                  f"requests in flight: max {max(s.in_flight for s in self.samples)} sampled,"
                  f" {drained.in_flight} once drained (limit {IN_FLIGHT_LIMIT}; the /metrics"
                  " scrape counts itself)")  # fmt: skip
            series = " ".join(f"{s.rss_mib:.0f}" for s in self.samples[::6])
            print(f"proxy RSS MiB every {6 * SAMPLE_EVERY:.0f} s: {series}")
            if rss_growth > RSS_LIMIT_MIB:
                fails.append(f"RSS grew {rss_growth:.1f} MiB after the warm-up")
            if fd_growth > FD_LIMIT:
                fails.append(f"{fd_growth} more FDs open once idle than before the load")
            if task_growth > TASK_LIMIT:
                fails.append(f"{task_growth} more asyncio tasks once idle than before the load")
            if drained.in_flight > IN_FLIGHT_LIMIT:
                fails.append(f"{drained.in_flight} requests still in flight after the load")
        logged = self.proxy_log()
        print(f"proxy log: {sum(logged.values())} lines at WARNING and up")
        for (level, msg), n in logged.most_common(8):
            print(f"  {n:6} {level} {msg}")
        print(f"proxy exit code on SIGTERM: {exit_code}")
        if errors := sum(n for (level, _), n in logged.items() if level != "WARNING"):
            fails.append(f"the proxy logged {errors} errors")
        if crashed:
            fails.append("the proxy process died during the soak")
        elif exit_code != 0:
            fails.append(f"the proxy did not exit 0 on SIGTERM ({exit_code})")
        if sum(self.errors.values()):
            fails.append(f"{sum(self.errors.values())} requests went wrong")
        if self.shed > 0.05 * (self.sent + self.shed):
            fails.append(f"{self.shed} ticks shed: the load was not delivered")
        print("PASS" if not fails else "FAIL: " + "; ".join(fails))
        return not fails

    def proxy_log(self) -> Counter[tuple[str, str]]:
        """Warnings and errors by message (numbers folded), from the proxy's JSON log lines."""
        seen: Counter[tuple[str, str]] = Counter()
        for line in (self.work / "proxy.log").read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                seen["raw", line[:100]] += 1
                continue
            if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                what = " ".join([str(entry.get("msg")), *entry.get("stacktrace", [])[-1:]])
                seen[entry["level"], re.sub(r"\d+", "N", what)[:120]] += 1
        return seen


def metric(text: str, name: str) -> float:
    found = re.search(rf"^cpi_proxy_{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def soak(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory(prefix="cpi-proxy-soak-") as tmp:
        run = Soak(args, Path(tmp))
        try:
            await run.start()
            return await run.run()
        except BaseException:
            print((Path(tmp) / "proxy.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
            for runner in run.runners:
                await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=200, help="requests per second")
    parser.add_argument("--users", type=int, default=200, help="users with long-lived tokens")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="open requests at most")
    sys.exit(0 if asyncio.run(soak(parser.parse_args())) else 1)


if __name__ == "__main__":
    main()
