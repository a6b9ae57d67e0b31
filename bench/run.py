"""`make bench`: cpi-proxy side by side with a direct call, nginx and a bare aiohttp proxy.

Everything runs on this machine, on loopback. With 2+ cores the proxy under test is pinned to
core 0 and everything else (wrk, the nginx upstream, the emulated XSUAA, this script) to the
other cores, so CPU figures mean "per proxy core". Results: a markdown table on stdout and JSON
in bench/results/.

    python bench/run.py [--duration 10] [--connections 32] [--users 1000] [--stream-mib 1024]
                        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.dev import EmulatedXsuaa, make_dev_ca

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CORES = os.cpu_count() or 1
PROXY_CPU = "0"
OTHER_CPUS = ",".join(str(c) for c in range(1, CORES)) or "0"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    system: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_req: float | None = None
    peak_rss_mib: float | None = None
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(tool: str, package: str) -> str:
    """Find a tool, installing its Debian package when we are root (CI, dev machines)."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)  # noqa: S607
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True)  # noqa: S607
        found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        sys.exit(f"bench: {tool} is needed (Debian package {package})")
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def rss_mib(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


async def wait_port(port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = Path(process.args[-1]).name if isinstance(process.args, list) else ""
            raise RuntimeError(f"the process on port {port} exited ({log}); see its log")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def _ms(value: str) -> float:
    found = re.match(r"([\d.]+)(us|ms|s|m)$", value)
    if found is None:
        raise RuntimeError(f"unexpected wrk latency {value!r}")
    number, unit = found.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


async def wrk(url: str, args: argparse.Namespace, headers: Mapping[str, str]) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text('wrk.method = "POST"\nwrk.body = "hello, iflow"\n')
    command = ["taskset", "-c", OTHER_CPUS, "wrk", "-t1", f"-c{args.connections}"]
    command += [f"-d{args.duration}s", "--latency", "-s", str(script)]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    process = await asyncio.create_subprocess_exec(
        *command, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await process.communicate())[0].decode()
    script.unlink()
    if "Latency Distribution" not in out:
        raise RuntimeError(f"wrk failed against {url}:\n{out}")
    found = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "requests": float(found.group(1)) if found else 0.0,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "errors": float(errors.group(1) if errors else 0)
        + (sum(int(g) for g in socket_errors.groups()) if socket_errors else 0),
    }


async def measure(
    system: str, url: str, pids: list[int], args: argparse.Namespace, headers: Mapping[str, str]
) -> Result:
    await wrk(url, argparse.Namespace(**{**vars(args), "duration": 2}), headers)  # warm up
    before = cpu_seconds(pids)
    run = await wrk(url, args, headers)
    used = cpu_seconds(pids) - before
    result = Result(system, run["rps"], run["p50"], run["p99"], errors=int(run["errors"]))
    if pids:
        result.cpu_us_per_req = used / max(run["requests"], 1) * 1e6
        result.peak_rss_mib = max(rss_mib(p) for p in pids)
    print(f"  {system}: {run['rps']:.0f} req/s, p99 {run['p99']:.2f} ms", flush=True)
    return result


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.processes: list[subprocess.Popen[bytes]] = []  # logs: process-<n>.log
        self.ca = make_dev_ca()
        self.ca_file = self.ca.write_ca(work)
        (work / "cert.pem").write_bytes(self.ca.cert_pem)
        key = work / "key.pem"
        key.write_bytes(self.ca.key_pem)
        key.chmod(0o600)
        self.xsuaa = EmulatedXsuaa()
        self.upstream_port = free_port()
        self.nginx_proxy_port = free_port()
        self.sink_port = free_port()
        self.env = {**os.environ, "SSL_CERT_FILE": str(self.ca_file), "LOG_LEVEL": "WARNING"}

    def spawn(
        self, command: list[str], cpus: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.work / f"process-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(  # noqa: S603
            ["taskset", "-c", cpus, *command],
            env=dict(env or self.env),
            cwd=self.work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def nginx(self, name: str, server: str, cpus: str) -> subprocess.Popen[bytes]:
        prefix = self.work / name
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            "worker_processes 1; daemon off; error_log stderr error; pid nginx.pid;\n"
            "events { worker_connections 4096; }\n"
            "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s;\n"
            f"client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp;\n"
            f"fastcgi_temp_path {prefix}/tmp; uwsgi_temp_path {prefix}/tmp;\n"
            f"scgi_temp_path {prefix}/tmp;\n{server}\n}}\n"
        )
        (prefix / "tmp").mkdir(exist_ok=True)
        return self.spawn([need("nginx", "nginx-light"), "-p", str(prefix), "-c", str(conf)], cpus)

    async def start_upstream(self) -> None:
        """nginx over HTTPS as the iFlow runtime: small 200s, a 1 GiB file, a body sink."""
        blob = self.work / "blob.bin"
        with blob.open("wb") as handle:
            handle.truncate(self.args.stream_mib * 1024 * 1024)
        # nginx workers drop root: they must be able to read the file (the key stays 0600).
        self.work.chmod(0o755)
        blob.chmod(0o644)
        server = (
            f"server {{ listen 127.0.0.1:{self.upstream_port} ssl;\n"
            f"ssl_certificate {self.work}/cert.pem; ssl_certificate_key {self.work}/key.pem;\n"
            "location /http/ { return 200 'ok from the iflow\\n'; }\n"
            f"location = /http/_download {{ alias {blob}; }}\n"
            "location = /http/_sink { client_max_body_size 0; proxy_request_buffering off;\n"
            f"  proxy_http_version 1.1; proxy_pass http://127.0.0.1:{self.sink_port}; }}\n}}"
        )
        self.nginx("nginx-upstream", server, OTHER_CPUS)
        await wait_port(self.upstream_port)

    async def start_sink(self) -> web.AppRunner:
        async def sink(request: web.Request) -> web.Response:
            count = 0
            async for chunk in request.content.iter_any():
                count += len(chunk)
            return web.json_response({"bytes": count})

        app = web.Application(client_max_size=0)
        app.router.add_post("/{tail:.*}", sink)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.sink_port).start()
        return runner

    async def start_xsuaa(self) -> web.AppRunner:
        runner = web.AppRunner(self.xsuaa.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ca.server_context())
        await site.start()
        self.xsuaa.base_url = f"https://localhost:{runner.addresses[0][1]}"
        self.xsuaa.token_validity = 43199
        return runner

    def start_cpi_proxy(self, port: int, loop: str) -> subprocess.Popen[bytes]:
        routes = self.work / "routes.json"
        routes.write_text(json.dumps({"routes": [
            {"name": "bench", "source": "^/cpi/(.*)$", "target": "/http/$1",
             "scope": "$XSAPPNAME.texfrontendscope", "csrf": False},
        ]}))  # fmt: skip
        env = {
            **self.env,
            "VCAP_SERVICES": json.dumps(
                self.xsuaa.vcap_services(f"https://localhost:{self.upstream_port}")
            ),
            "CPI_PROXY_CONFIG": str(routes),
            "PORT": str(port),
            "CPI_PROXY_LOOP": loop,
            "CPI_PROXY_CACHE_SIZE": str(max(10_000, self.args.users * 2)),
            # The cold run opens one connection per user at once.
            "CPI_PROXY_MAX_CLIENTS": str(max(1000, self.args.users + 100)),
        }
        command = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
        return self.spawn(
            command, PROXY_CPU if env.get("CPI_PROXY_WORKERS", "1") == "1" else "0-63", env
        )

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 15)

    async def stream(self, url: str, pid: int, headers: Mapping[str, str]) -> dict[str, float]:
        """Move stream_mib down and up through a proxy: MB/s, MiB per proxy CPU-s, RSS growth."""
        size = self.args.stream_mib * 1024 * 1024
        out: dict[str, float] = {}
        base_rss = rss_mib(pid, "VmRSS")
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            cpu, start = cpu_seconds([pid]), time.perf_counter()
            got = 0
            async with session.get(f"{url}/_download", headers=headers) as resp:
                async for chunk in resp.content.iter_any():
                    got += len(chunk)
            wall, used = time.perf_counter() - start, cpu_seconds([pid]) - cpu
            assert got == size, f"download moved {got} of {size} bytes"
            out["download_MBps"] = size / wall / 1e6
            out["download_MiB_per_cpu_s"] = self.args.stream_mib / max(used, 1e-9)

            async def body() -> AsyncIterator[bytes]:
                block = bytes(1024 * 1024)
                for _ in range(self.args.stream_mib):
                    yield block

            cpu, start = cpu_seconds([pid]), time.perf_counter()
            upload_headers = {**headers, "Content-Length": str(size)}
            async with session.post(f"{url}/_sink", data=body(), headers=upload_headers) as resp:
                answer = await resp.json()
            wall, used = time.perf_counter() - start, cpu_seconds([pid]) - cpu
            assert answer["bytes"] == size, f"upload moved {answer} of {size} bytes"
            out["upload_MBps"] = size / wall / 1e6
            out["upload_MiB_per_cpu_s"] = self.args.stream_mib / max(used, 1e-9)
        out["rss_growth_mib"] = rss_mib(pid) - base_rss
        return out

    async def cold(self, url: str) -> dict[str, float]:
        """N distinct users at once against a fresh proxy: one exchange each, none fails."""
        users = self.args.users
        tokens = [self.xsuaa.mint_user_token(f"user{i}") for i in range(users)]
        before = self.xsuaa.token_requests.total()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(token: str) -> int:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(url, data=b"hello", headers=headers) as resp:
                    await resp.read()
                    return resp.status

            start = time.perf_counter()
            statuses = await asyncio.gather(*(one(t) for t in tokens))
            elapsed = time.perf_counter() - start
        return {
            "users": users,
            "exchanges": self.xsuaa.token_requests.total() - before,
            "failed": sum(1 for s in statuses if s != 200),
            "seconds_to_serve_all": elapsed,
        }


async def run(args: argparse.Namespace) -> list[Result]:
    for tool, package in (("wrk", "wrk"), ("nginx", "nginx-light"), ("taskset", "util-linux")):
        need(tool, package)
    os.sched_setaffinity(0, {int(c) for c in OTHER_CPUS.split(",")})
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="cpi-proxy-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        sink, xsuaa = await bench.start_sink(), await bench.start_xsuaa()
        try:
            await bench.start_upstream()
            up = f"https://127.0.0.1:{bench.upstream_port}"
            auth = {"Authorization": "Bearer x"}
            print("measuring (a) direct, (b) nginx proxy_pass, (c) aiohttp pass-through,"
                  " (d) cpi-proxy warm, (e) cpi-proxy cold", flush=True)  # fmt: skip
            results.append(await measure("direct", f"{up}/http/echo", [], args, auth))

            server = (
                f"upstream cpi {{ server 127.0.0.1:{bench.upstream_port}; keepalive 64; }}\n"
                f"server {{ listen 127.0.0.1:{bench.nginx_proxy_port};\n"
                "location / { proxy_pass https://cpi; proxy_http_version 1.1;\n"
                "proxy_set_header Connection ''; proxy_set_header Authorization 'Bearer x';\n"
                "proxy_ssl_session_reuse on; } }"
            )
            nginx = bench.nginx("nginx-proxy", server, PROXY_CPU)
            await wait_port(bench.nginx_proxy_port)
            url = f"http://127.0.0.1:{bench.nginx_proxy_port}/http/echo"
            results.append(
                await measure(
                    "nginx proxy_pass", url, [nginx.pid, *children(nginx.pid)], args, auth
                )
            )
            await bench.stop(nginx)

            # (c) and (d) run side by side, idle but for the one being measured, and take
            # turns for --rounds rounds: each figure is the median of its rounds, so a burst
            # of noise on this machine hits one round of one system, not a whole system.
            port = free_port()
            env = {**bench.env, "UPSTREAM": up, "PORT": str(port)}
            command = [sys.executable, str(ROOT / "bench" / "passthrough.py")]
            passthrough = bench.spawn(command, PROXY_CPU, env)
            await wait_port(port, passthrough)
            token = {"Authorization": f"Bearer {bench.xsuaa.mint_user_token('bench')}"}
            loops = ["asyncio"] + (["uvloop"] if _has_uvloop() else [])
            contenders = [("aiohttp pass-through", f"http://127.0.0.1:{port}", passthrough, auth)]
            for loop in loops:
                port = free_port()
                proxy = bench.start_cpi_proxy(port, loop)
                await wait_port(port, proxy)
                url = f"http://127.0.0.1:{port}/cpi"
                contenders.append((f"cpi-proxy warm ({loop})", url, proxy, token))
            rounds: dict[str, list[Result]] = {name: [] for name, *_ in contenders}
            for round_no in range(args.rounds):
                print(f"  round {round_no + 1} of {args.rounds}", flush=True)
                for name, url, process, headers in contenders:
                    path = "/http/echo" if process is passthrough else "/echo"
                    rounds[name].append(
                        await measure(name, url + path, [process.pid], args, headers)
                    )
            # Streams take turns too: the pass-through and the last loop's cpi-proxy.
            streamers = [
                c for c in contenders if c[2] is passthrough or c[0].endswith(loops[-1] + ")")
            ]
            streams: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in streamers}
            for _ in range(args.rounds):
                for name, url, process, headers in streamers:
                    prefix = url + ("/http" if process is passthrough else "")
                    streams[name].append(await bench.stream(prefix, process.pid, headers))
            for name, *_ in contenders:
                result = median(rounds[name])
                if name in streams:
                    runs = streams[name]
                    result.extra.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
                    result.extra["rss_growth_mib"] = max(r["rss_growth_mib"] for r in runs)
                    result.extra["stream_rounds"] = runs
                results.append(result)
            for _, _, process, _ in contenders:
                await bench.stop(process)

            port = free_port()
            proxy = bench.start_cpi_proxy(port, loops[-1])
            await wait_port(port, proxy)
            cold = await bench.cold(f"http://127.0.0.1:{port}/cpi/echo")
            cold["peak_rss_mib"] = rss_mib(proxy.pid)
            results.append(Result(f"cpi-proxy cold ({args.users} users)", extra=cold))
            print(f"  cold: {cold}", flush=True)
            await bench.stop(proxy)
        except Exception:
            for log in sorted(Path(tmp).glob("process-*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            raise
        finally:
            for process in bench.processes:
                if process.poll() is None:
                    process.kill()
            await sink.cleanup()
            await xsuaa.cleanup()
    return results


def median(runs: list[Result]) -> Result:
    """Each figure's median over the rounds (peak RSS: the highest)."""

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    cpu = [r.cpu_us_per_req for r in runs if r.cpu_us_per_req is not None]
    rss = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    return Result(
        runs[0].system,
        rps=mid([r.rps for r in runs]),
        p50_ms=mid([r.p50_ms for r in runs]),
        p99_ms=mid([r.p99_ms for r in runs]),
        cpu_us_per_req=mid(cpu) if cpu else None,
        peak_rss_mib=max(rss) if rss else None,
        errors=sum(r.errors for r in runs),
        extra={"rounds": [asdict(r) for r in runs]},
    )


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def table(results: list[Result]) -> str:
    by = {r.system: r for r in results}
    floor_c = by.get("aiohttp pass-through")
    floor_b = by.get("nginx proxy_pass")

    def ratio(value: float | None, base: Result | None) -> str:
        if value is None or base is None or not base.cpu_us_per_req:
            return "-"
        return f"{value / base.cpu_us_per_req:.2f}"

    lines = [
        "| system | req/s | p50 ms | p99 ms | CPU µs/req | ÷ nginx | ÷ pass-through | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if not r.rps:
            continue
        cpu = f"{r.cpu_us_per_req:.0f}" if r.cpu_us_per_req else "-"
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib else "-"
        lines.append(
            f"| {r.system} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {cpu} |"
            f" {ratio(r.cpu_us_per_req, floor_b)} | {ratio(r.cpu_us_per_req, floor_c)} | {rss} |"
        )
    lines += ["", "| streaming | down MB/s | down MiB/CPU-s | up MB/s | up MiB/CPU-s | RSS growth MiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        e = r.extra
        if "download_MBps" in e:
            lines.append(
                f"| {r.system} | {e['download_MBps']:.0f} | {e['download_MiB_per_cpu_s']:.0f} |"
                f" {e['upload_MBps']:.0f} | {e['upload_MiB_per_cpu_s']:.0f} |"
                f" {e['rss_growth_mib']:.1f} |"
            )
    for r in results:
        if "users" in r.extra:
            e = r.extra
            lines.append(
                f"\ncold: {e['users']:.0f} distinct users at once → {e['exchanges']:.0f} exchanges,"
                f" {e['failed']:.0f} failed, all served in {e['seconds_to_serve_all']:.2f} s,"
                f" peak RSS {e['peak_rss_mib']:.0f} MiB"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=1000, help="distinct users, cold run")
    parser.add_argument("--stream-mib", type=int, default=1024, help="MiB each way")
    parser.add_argument("--rounds", type=int, default=3, help="turns of (c) and (d); medians")
    args = parser.parse_args()
    if CORES < 2:
        print("bench: one core only; figures are not per proxy core", file=sys.stderr)
    results = asyncio.run(run(args))
    report = table(results)
    print("\n" + report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"bench-{stamp}.json"
    machine = {"cores": CORES, "python": platform.python_version(), "machine": platform.machine()}
    path.write_text(json.dumps({"args": vars(args), "machine": machine,
                                "results": [asdict(r) for r in results]}, indent=2))  # fmt: skip
    print(f"\nJSON: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
