"""`make users`: N distinct users, one request each, through a real `cpi-proxy serve`.

Why: every new user costs the proxy a validated-claims entry and a CPI token, and both caches
are capped by CPI_PROXY_CACHE_SIZE (default 10,000). With more users than that, old entries are
evicted and the proxy's RSS must level off, whatever N is. This checks it end to end.

The world runs on loopback. The emulated XSUAA runs over HTTPS in this process: it checks each
assertion and signs one CPI token per exchange, as the real one does. The iFlow is nginx over
HTTPS answering 200 to every path: the emulated iFlow runtime would verify every CPI token and
record every request, CPU and memory on this side that tell nothing about the proxy. User tokens
(distinct `user_name`, `user_id`, `jti`) are signed with the emulator's key by a process pool,
in batches ahead of the load, so minting overlaps the requests instead of preceding them.

Every `--every` users the proxy's VmRSS, open FDs and, from its /metrics, the CPI-token cache
size and evictions are sampled. Exit 1 on any answer but 200, a cache size above the cap, or
RSS growing more than 16 MiB over the second half of the run once the cache is full.

    python bench/users.py [--users 100000] [--cache-size 10000] [--concurrency 64] [--every 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from proxy.dev import JWT_BEARER, EmulatedXsuaa, cached_rsa_key, make_dev_ca

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024
RSS_GROWTH_LIMIT_MIB = 16.0
WARM_USERS = 1000  # the baseline for "bytes per cached user": pools, TLS and code paths warm
BATCH = 250  # tokens per minting task
USERS_NS = uuid.UUID("0c1e9a57-3f4b-4d2a-8e6c-5b7d9f1a2c3e")
ROUTES = {"routes": [
    {"name": "users", "source": "^/cpi/(.*)$", "target": "/http/$1",
     "scope": "$XSAPPNAME.texfrontendscope", "csrf": False},
]}  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    users: int  # answered so far
    seconds: float
    rss_mib: float
    fds: int
    cached: int  # cpi_proxy_token_cache_size
    evictions: int  # cpi_proxy_token_cache_evictions_total
    exchanges: int  # jwt-bearer requests XSUAA has answered


# --- minting, in worker processes --------------------------------------------------------------

_minter: dict[str, Any] = {}


def init_minter(key_pem: bytes, header: dict[str, Any], template: dict[str, Any]) -> None:
    _minter["key"] = serialization.load_pem_private_key(key_pem, password=None)
    _minter["header"], _minter["template"] = header, template


def user_name(i: int) -> str:
    return f"user{i:07d}"


def mint_batch(start: int, stop: int, expires_in: int) -> list[str]:
    """Tokens as the emulator's mint_user_token signs them, one distinct user each."""
    key, header, template = _minter["key"], _minter["header"], _minter["template"]
    now = int(time.time())
    tokens = []
    for i in range(start, stop):
        name = user_name(i)
        user_id = str(uuid.uuid5(USERS_NS, name))
        claims = {
            **template,
            "user_name": name,
            "given_name": name.capitalize(),
            "email": f"{name}@example.com",
            "sub": user_id,
            "user_id": user_id,
            "jti": uuid.uuid4().hex,
            "rev_sig": secrets.token_hex(4),
            "auth_time": now,
            "iat": now,
            "exp": now + expires_in,
        }
        tokens.append(jwt.encode(claims, key, algorithm="RS256", headers=header))
    return tokens


# --- the run -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_nginx() -> str:
    """nginx, installed from Debian when we are root (CI, dev machines)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)  # noqa: S607
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)  # noqa: S607
        found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found:
        sys.exit("users: nginx is needed (Debian package nginx-light)")
    return found


def metric(text: str, name: str) -> int:
    found = re.search(rf"^cpi_proxy_{name} (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


class Users:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.ca = make_dev_ca()
        self.xsuaa = EmulatedXsuaa()
        self.runner: web.AppRunner | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.proxy: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{free_port()}"
        self.checkpoints: list[Checkpoint] = []
        self.marks = {min(WARM_USERS, args.users), args.users}
        self.marks.update(range(args.every, args.users + 1, args.every))
        self.done = 0
        self.failures: dict[str, int] = {}
        self.examples: list[str] = []
        self.started = 0.0

    # --- the world ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.runner = web.AppRunner(self.xsuaa.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ca.server_context())
        await site.start()
        self.xsuaa.base_url = f"https://localhost:{self.runner.addresses[0][1]}"
        upstream = await self.start_nginx()
        (self.work / "routes.json").write_text(json.dumps(ROUTES))
        env = {
            **os.environ,
            "SSL_CERT_FILE": str(self.ca.write_ca(self.work)),
            "LOG_LEVEL": "WARNING",
            "VCAP_SERVICES": json.dumps(self.xsuaa.vcap_services(upstream)),
            "CPI_PROXY_CONFIG": str(self.work / "routes.json"),
            "PORT": self.base.rsplit(":", 1)[1],
            "CPI_PROXY_CACHE_SIZE": str(self.args.cache_size),
            "CPI_PROXY_MAX_CLIENTS": str(max(1000, self.args.concurrency + 100)),
        }
        command = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
        self.proxy = self.spawn(command, env, "proxy.log")
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                if self.proxy.poll() is not None:
                    raise RuntimeError("the proxy exited at start")
                try:
                    async with session.get(f"{self.base}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("the proxy did not become ready within 30 s")

    def spawn(self, command: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with (self.work / log).open("wb") as out:
            process = subprocess.Popen(  # noqa: S603
                command, env=env, cwd=self.work, stdout=out, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return process

    async def start_nginx(self) -> str:
        port, prefix = free_port(), self.work / "nginx"
        (prefix / "tmp").mkdir(parents=True)
        (prefix / "cert.pem").write_bytes(self.ca.cert_pem)
        key = prefix / "key.pem"
        key.write_bytes(self.ca.key_pem)
        key.chmod(0o600)
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = " ".join(f"{kind}_temp_path {prefix / 'tmp'};" for kind in kinds)
        (prefix / "nginx.conf").write_text(
            "worker_processes 1; daemon off; error_log stderr error; pid nginx.pid;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; keepalive_requests 1000000; {temp}\n"
            f"server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {prefix}/cert.pem;\n"
            f"ssl_certificate_key {key};\n"
            "location / { return 200 'ok from the iflow\\n'; } } }\n"
        )
        nginx = [find_nginx(), "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        process = self.spawn(nginx, dict(os.environ), "nginx.log")
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.work / 'nginx.log').read_text()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return f"https://localhost:{port}"
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError("nginx did not listen within 30 s")

    # --- tokens ahead of the load ------------------------------------------------------------

    def minter(self) -> ProcessPoolExecutor:
        """Workers signing with the emulator's key (`spawn`: this process has a loop, threads)."""
        template_token = self.xsuaa.mint_user_token(user_name(0))
        template = jwt.decode(template_token, options={"verify_signature": False})
        header = jwt.get_unverified_header(template_token)
        header = {k: v for k, v in header.items() if k in ("kid", "jku")}
        key_pem = cached_rsa_key(self.xsuaa.signing_kid).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ProcessPoolExecutor(
            max_workers=os.cpu_count() or 1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_minter,
            initargs=(key_pem, header, template),
        )

    async def feed(self, pool: ProcessPoolExecutor, queue: asyncio.Queue[str | None]) -> None:
        """Batches of tokens, in order, a few batches ahead of the requests."""
        ahead: deque[Future[list[str]]] = deque()
        starts = iter(range(0, self.args.users, BATCH))
        expires_in = 4 * 3600  # longer than any run: no entry expires, each one is evicted
        while True:
            while len(ahead) < 4 * (os.cpu_count() or 1):
                start = next(starts, None)
                if start is None:
                    break
                stop = min(start + BATCH, self.args.users)
                ahead.append(pool.submit(mint_batch, start, stop, expires_in))
            if not ahead:
                break
            for token in await asyncio.wrap_future(ahead.popleft()):
                await queue.put(token)
        for _ in range(self.args.concurrency):
            await queue.put(None)

    # --- load and samples --------------------------------------------------------------------

    async def send(
        self,
        session: aiohttp.ClientSession,
        ops: aiohttp.ClientSession,
        queue: asyncio.Queue[str | None],
    ) -> None:
        while (token := await queue.get()) is not None:
            if sum(self.failures.values()) >= 100:
                continue  # enough evidence; drain the queue so the feeder can finish
            headers = {"Authorization": f"Bearer {token}"}
            try:
                async with session.get(f"{self.base}/cpi/echo", headers=headers) as resp:
                    body = await resp.read()
                    outcome = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome, body = type(exc).__name__, b""
            if outcome != "200":
                self.failures[outcome] = self.failures.get(outcome, 0) + 1
                if len(self.examples) < 5:
                    self.examples.append(f"{outcome} {body[:200]!r}")
            self.done += 1
            if self.done in self.marks:
                await self.sample(ops)

    async def sample(self, ops: aiohttp.ClientSession) -> None:
        assert self.proxy is not None
        async with ops.get(f"{self.base}/metrics") as resp:
            text = await resp.text()
        status = Path(f"/proc/{self.proxy.pid}/status").read_text()  # noqa: ASYNC240 - procfs
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        point = Checkpoint(
            users=self.done,
            seconds=round(time.monotonic() - self.started, 1),
            rss_mib=round(rss, 1),
            fds=len(os.listdir(f"/proc/{self.proxy.pid}/fd")),
            cached=metric(text, "token_cache_size"),
            evictions=metric(text, "token_cache_evictions_total"),
            exchanges=self.xsuaa.token_requests[JWT_BEARER],
        )
        self.checkpoints.append(point)
        print(
            f"  {point.users:>7,} users {point.seconds:7.1f} s  RSS {point.rss_mib:6.1f} MiB"
            f"  fds {point.fds:4}  cached {point.cached:>7,}  evicted {point.evictions:>7,}",
            flush=True,
        )

    async def run(self) -> dict[str, Any]:
        a = self.args
        pool = self.minter()
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=4 * a.concurrency)
        connector = aiohttp.TCPConnector(limit=a.concurrency)
        timeout = aiohttp.ClientTimeout(total=60)
        try:
            async with (
                aiohttp.ClientSession() as ops,
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            ):
                self.started = time.monotonic()
                await self.sample(ops)  # 0 users: the proxy as it starts
                self.done = 0
                await asyncio.gather(
                    self.feed(pool, queue),
                    *(self.send(session, ops, queue) for _ in range(a.concurrency)),
                )
                elapsed = time.monotonic() - self.started
                async with ops.get(f"{self.base}/metrics") as resp:
                    text = await resp.text()
        finally:
            pool.shutdown(cancel_futures=True)
        assert self.proxy is not None
        status = Path(f"/proc/{self.proxy.pid}/status").read_text()  # noqa: ASYNC240 - procfs
        peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        self.proxy.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = await asyncio.to_thread(self.proxy.wait, 15)
        except subprocess.TimeoutExpired:
            exit_code = None
        return self.summary(elapsed, peak, text, exit_code)

    # --- the verdict -------------------------------------------------------------------------

    def summary(
        self, elapsed: float, peak: float, text: str, exit_code: int | None
    ) -> dict[str, Any]:
        a, points, fails = self.args, self.checkpoints, []
        if self.failures:
            fails.append(f"answers other than 200: {self.failures}")
        over = [p for p in points if p.cached > a.cache_size]
        if over:
            fails.append(f"cache size {max(p.cached for p in over)} above the cap {a.cache_size}")
        warm = next((p for p in points if p.users >= min(WARM_USERS, a.users)), points[0])
        # Until the cache is full (or the run ends): a few evictions around the checkpoint
        # that fills it do not matter, the entries counted are the ones cached then.
        fill = next((p for p in points if p.cached >= a.cache_size), points[-1])
        per_user = None
        if fill.cached > warm.cached:
            grown = (fill.rss_mib - warm.rss_mib) * MIB
            per_user = round(grown / (fill.cached - warm.cached))
        # The plateau: from half-way (or the cache's filling, if later) to the end.
        end = points[-1]
        start = next((p for p in points if p.users >= max(a.users / 2, a.cache_size)), None)
        plateau: dict[str, Any] | None = None
        if start is not None and start.users < end.users and end.evictions > 0:
            window = [p for p in points if p.users >= start.users]
            plateau = {
                "from_users": start.users,
                "to_users": end.users,
                "rss_growth_mib": round(end.rss_mib - start.rss_mib, 1),
                "max_rss_over_start_mib": round(max(p.rss_mib for p in window) - start.rss_mib, 1),
                "limit_mib": RSS_GROWTH_LIMIT_MIB,
            }
            if plateau["rss_growth_mib"] > RSS_GROWTH_LIMIT_MIB:
                fails.append(
                    f"RSS grew {plateau['rss_growth_mib']} MiB from {start.users:,} users to"
                    f" {end.users:,} with the cache full"
                )
        if exit_code != 0:
            fails.append(f"the proxy did not exit 0 on SIGTERM ({exit_code})")
        pattern = r'^cpi_proxy_token_exchanges_total\{grant="([^"]+)",outcome="([^"]+)"\} (\S+)$'
        proxy_exchanges = {f"{g} {o}": int(float(v)) for g, o, v in re.findall(pattern, text, re.M)}
        log = (self.work / "proxy.log").read_text(errors="replace").splitlines()
        return {
            "verdict": "PASS" if not fails else "FAIL",
            "fails": fails,
            "examples": self.examples,
            "users": a.users,
            "answered": self.done,
            "cache_size_cap": a.cache_size,
            "concurrency": a.concurrency,
            "elapsed_s": round(elapsed, 1),
            "users_per_s": round(self.done / elapsed, 1),
            "peak_rss_mib": round(peak, 1),
            "bytes_per_cached_user_while_filling": per_user,
            "plateau": plateau,
            "cached_at_end": end.cached,
            "evictions": end.evictions,
            "fds": {"start": points[0].fds, "max": max(p.fds for p in points), "end": end.fds},
            "xsuaa_exchanges": self.xsuaa.token_requests[JWT_BEARER],
            "xsuaa_token_posts": self.xsuaa.token_posts,
            "proxy_exchanges": proxy_exchanges,
            "proxy_log_lines": len(log),
            "proxy_log_tail": log[-5:],
            "proxy_exit_code": exit_code,
            "checkpoints": [asdict(p) for p in points],
        }


def revision() -> str:
    """The commit measured, "+dirty" when proxy/ has uncommitted changes."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(ROOT), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        return done.stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + (
            "+dirty" if git("status", "--porcelain", "proxy") else ""
        )
    except OSError:
        return "unknown"


def markdown(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"{r['users']:,} distinct users, cache cap {r['cache_size_cap']:,},"
        f" concurrency {r['concurrency']}: {r['answered']:,} answered in {r['elapsed_s']} s"
        f" ({r['users_per_s']}/s); XSUAA exchanges {r['xsuaa_exchanges']:,}",
        "",
        "| users | s | RSS MiB | fds | cached | evictions | exchanges |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in r["checkpoints"]:
        lines.append(
            f"| {p['users']:,} | {p['seconds']} | {p['rss_mib']} | {p['fds']} |"
            f" {p['cached']:,} | {p['evictions']:,} | {p['exchanges']:,} |"
        )
    plateau = r["plateau"]
    lines += [
        "",
        f"peak RSS {r['peak_rss_mib']} MiB; bytes per cached user while filling:"
        f" {r['bytes_per_cached_user_while_filling']}; evictions {r['evictions']:,};"
        f" fds {r['fds']}",
        "RSS with the cache full: "
        + (
            f"{plateau['rss_growth_mib']:+} MiB from {plateau['from_users']:,} to"
            f" {plateau['to_users']:,} users (highest {plateau['max_rss_over_start_mib']:+};"
            f" limit {plateau['limit_mib']})"
            if plateau
            else "not measured (no evictions: the run never went past the cap)"
        ),
        f"proxy: exchanges {r['proxy_exchanges']}, {r['proxy_log_lines']} log lines,"
        f" exit code {r['proxy_exit_code']}",
        r["verdict"] + ("" if not r["fails"] else ": " + "; ".join(r["fails"])),
    ]
    lines += [f"  {example}" for example in r["examples"]]
    return "\n".join(lines)


async def users(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cpi-proxy-users-") as tmp:
        run = Users(args, Path(tmp))
        try:
            await run.start()
            return await run.run()
        except BaseException:
            for log in ("proxy.log", "nginx.log"):
                path = Path(tmp) / log
                if path.exists():
                    print(f"--- {log}\n{path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        finally:
            for process in run.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if run.runner is not None:
                await run.runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--users", type=int, default=100_000, help="distinct users, one request each"
    )
    parser.add_argument("--cache-size", type=int, default=10_000, help="CPI_PROXY_CACHE_SIZE")
    parser.add_argument("--concurrency", type=int, default=64, help="requests open at most")
    parser.add_argument("--every", type=int, default=5000, help="users between samples")
    args = parser.parse_args()
    if min(args.users, args.cache_size, args.concurrency, args.every) < 1:
        parser.error("--users, --cache-size, --concurrency and --every must be at least 1")
    print(f"cpi-proxy users: {args.users:,} distinct users, cache cap {args.cache_size:,}",
          flush=True)  # fmt: skip
    result = asyncio.run(users(args))
    print("\n" + markdown(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"users-{stamp}.json"
    machine = {"cores": os.cpu_count(), "python": platform.python_version(), "code": revision()}
    path.write_text(json.dumps({"args": vars(args), "machine": machine, **result}, indent=2))
    print(f"JSON: {path.relative_to(ROOT)}")
    sys.exit(0 if result["verdict"] == "PASS" else 1)


if __name__ == "__main__":
    main()
