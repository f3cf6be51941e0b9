"""The gateway's benchmark driver (``bench/run`` calls it; see bench/README.md).

Starts, all on 127.0.0.1 and on free ports: a redis-server of its own, a tiny backend (Debian
nginx with its own prefix, else a tiny aiohttp app), the development provider, a bare aiohttp
pass-through proxy (the baseline) and ``gateway run --workers N``; logs in through the
provider; runs wrk against the bare proxy and the gateway in alternating rounds; measures
logins, stored-session counts, memory and the per-request pieces; writes RESULTS.md.

Every process it starts is stopped by its PID at the end, also on Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The repository, not bench/ (where this file would shadow the ``bench`` package).
sys.path[0] = str(ROOT)

import aiohttp  # noqa: E402
import yaml  # noqa: E402
from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: E402

from gateway.config import Settings, validate  # noqa: E402
from gateway.crypto import KeyRing, decode_secret, new_secret  # noqa: E402
from gateway.session import Ticket  # noqa: E402

# The suite's port picker: ports below the kernel's ephemeral range, which no outgoing
# connection can take between the moment one is picked and the moment its server binds it.
from tests.support.ports import free_port  # noqa: E402

CLIENT_ID = "gateway-bench"
COOKIE = "gw_bench"
PREFIX = "gwb:"
USER = ("alice", "alice")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BODY = b"ok\n"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class Procs:
    """The processes this run started; ``stop_all`` ends each (and its descendants) by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out = (self.workdir / f"{name}.log").open("wb")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        environ["PYTHONPATH"] = str(ROOT)
        environ.update(env or {})
        # A session of its own: a Ctrl-C in the terminal reaches the driver only, which
        # then stops everything in order.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=environ, start_new_session=True)  # fmt: skip
        out.close()
        self.items.append((name, proc))
        return proc

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def run(self, name: str, argv: list[str], timeout: float) -> str:
        """Start, wait (bounded), stop; the output."""
        proc = self.start(name, argv)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} did not finish within {timeout:.0f} s") from None
        finally:
            self.stop(proc)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{name} exited with {proc.returncode}:\n{self.output(name)[-3000:]}"
            )
        return self.output(name)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        kids = children_of(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Workers a parent did not take down with it (a SIGTERM'd parent may not).
        _signal(kids, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal(kids, signal.SIGKILL)
        self.items = [(n, p) for n, p in self.items if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.items)):
            self.stop(proc)


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # only 127.0.0.1 URLs
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(
    what: str, check: Any, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, RedisConnectionError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def answers(url: str, headers: dict[str, str] | None = None) -> bool:
    status, body = http_get(url, headers)
    return status == 200 and body == BODY


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Stack:
    redis_port: int
    backend_url: str
    backend_kind: str
    idp_url: str
    bare_url: str
    bare_procs: list[subprocess.Popen[bytes]]
    gateway_url: str
    gateway: subprocess.Popen[bytes]
    config: dict[str, Any]
    workers: int

    def gateway_pids(self) -> list[int]:
        return [self.gateway.pid, *children_of(self.gateway.pid)]

    def bare_pids(self) -> list[int]:
        return [p.pid for p in self.bare_procs]


def start_redis(procs: Procs) -> int:
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"])  # fmt: skip
    wait_until("redis-server", lambda: redis_cmd(port, "PING") is True, proc)
    return port


def redis_cmd(port: int, *args: str) -> Any:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30, decode_responses=True)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )


def start_backend(procs: Procs, workdir: Path) -> tuple[str, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    nginx = nginx_binary()
    if nginx is None:
        proc = procs.start(
            "backend", [sys.executable, str(ROOT / "bench" / "backend.py"), str(port)]
        )
        wait_until("aiohttp backend", lambda: answers(url + "/"), proc)
        return url, "aiohttp (nginx not installed)"
    prefix = workdir / "nginx"
    prefix.mkdir()
    temps = "\n".join(
        f"    {n}_temp_path {prefix / n};"
        for n in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{temps}
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
""")
    proc = procs.start("nginx", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                 "-e", str(prefix / "error.log")])  # fmt: skip
    wait_until("nginx", lambda: answers(url + "/"), proc)
    return url, "nginx, 1 worker, `return 200`"


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("gateway")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli"]


def gateway_config(
    port: int, idp_url: str, backend_url: str, redis_port: int, client_secret: str
) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "provider": {"issuer": idp_url, "client_id": CLIENT_ID, "client_secret": client_secret,
                     "scopes": ["openid", "email", "profile", "offline_access"]},
        "session": {"store": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                    "key_prefix": PREFIX, "cookie_name": COOKIE, "cookie_secure": False,
                    "cookie_secrets": [new_secret()]},
        "routes": [{"prefix": "/", "upstream": backend_url}],
        "observability": {"log_format": "json", "log_level": "info"},
    }  # fmt: skip


def start_stack(procs: Procs, workdir: Path, workers: int) -> Stack:
    redis_port = start_redis(procs)
    backend_url, backend_kind = start_backend(procs, workdir)
    gw_port, idp_port, bare_port = free_port(), free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{gw_port}"
    client_secret = secrets.token_urlsafe(24)
    idp = procs.start("idp", [sys.executable, str(ROOT / "bench" / "idp.py"), str(idp_port),
                              gateway_url, CLIENT_ID, client_secret])  # fmt: skip
    idp_url = f"http://127.0.0.1:{idp_port}"
    wait_until(
        "the development provider",
        lambda: http_get(idp_url + "/.well-known/openid-configuration")[0] == 200,
        idp,
    )
    bare_url = f"http://127.0.0.1:{bare_port}"
    bare = [procs.start(f"bare-{i}", [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), "127.0.0.1",
                                      str(bare_port), backend_url]) for i in range(workers)]  # fmt: skip
    for p in bare:
        wait_until("the bare proxy", lambda: answers(bare_url + "/"), p)
    config = gateway_config(gw_port, idp_url, backend_url, redis_port, client_secret)
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    gw = procs.start(
        "gateway",
        [*gateway_command(), "run", "--config", str(config_path), "--workers", str(workers)],
    )
    wait_until("gateway run", lambda: http_get(gateway_url + "/readyz")[0] == 200, gw, timeout=60)
    if workers > 1:  # every worker up (each one binds the port itself)
        wait_until("every gateway worker", lambda: len(children_of(gw.pid)) >= workers, gw)
        time.sleep(1.0)
    return Stack(redis_port, backend_url, backend_kind, idp_url, bare_url, bare, gateway_url, gw,
                 config, workers)  # fmt: skip


# The gateway's cost by layer: the same gateway with parts of the hot path switched off by
# configuration, each a `gateway run --workers N` of its own on the same Redis, backend and
# provider. (target name, route settings, log level)
LAYERS = (
    ("public, no log", {"auth": "none"}, "warning"),
    ("public", {"auth": "none"}, "info"),
)


def start_layers(procs: Procs, workdir: Path, stack: Stack) -> dict[str, tuple[str, int]]:
    """The LAYERS gateways: target name -> (URL, parent pid)."""
    started: dict[str, tuple[str, int]] = {}
    for i, (name, route, level) in enumerate(LAYERS):
        port = free_port()
        config = json.loads(json.dumps(stack.config))
        config["server"].update(port=port, public_url=f"http://127.0.0.1:{port}")
        config["routes"][0].update(route)
        config["observability"]["log_level"] = level
        path = workdir / f"gateway-layer-{i}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [*gateway_command(), "run", "--config", str(path), "--workers", str(stack.workers)]
        proc = procs.start(f"gateway-layer-{i}", argv)
        url = f"http://127.0.0.1:{port}"
        ready = f"{url}/readyz"
        wait_until(f"the {name} gateway", lambda u=ready: http_get(u)[0] == 200, proc, 60)
        if stack.workers > 1:
            kids = proc.pid
            wait_until("every worker", lambda k=kids: len(children_of(k)) >= stack.workers, proc)
        started[name] = (url, proc.pid)
    return started


def uses_uvloop(pids: list[int]) -> bool:
    """Whether every one of these processes runs a libuv loop: libuv wakes its loop through
    an eventfd, asyncio's own loop through a socket pair."""
    found = []
    for pid in pids:
        kinds = set()
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                kinds.add(os.readlink(fd))
        found.append("anon_inode:[eventfd]" in kinds)
    return bool(found) and all(found)


# -- logging in -----------------------------------------------------------------------------


async def login(gateway_url: str) -> str:
    """The full browser flow (start → provider sign-in → consent → callback → first page);
    the session cookie's value."""
    from tests.idp_client import http_login

    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, headers={"Accept": "text/html"}) as http:
        result = await http_login(http, gateway_url + "/oauth2/start?rd=/", *USER)
        if result.status != 200 or result.body.encode() != BODY:
            raise RuntimeError(f"login ended with {result.status} at {result.url}")
        for cookie in jar:
            if cookie.key == COOKIE:
                return cookie.value
    raise RuntimeError("login set no session cookie")


async def logins(stack: Stack, count: int, concurrency: int) -> dict[str, Any]:
    pids = stack.gateway_pids()
    cpu0 = cpu_seconds(pids)
    done = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        while done < count:
            done += 1
            await login(stack.gateway_url)

    async with asyncio.timeout(max(120.0, count * 2.0)):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    cpu = cpu_seconds(pids) - cpu0
    return {"logins": done, "concurrency": concurrency, "seconds": wall,
            "per_second": done / wall, "gateway_cpu_ms": cpu / done * 1000}  # fmt: skip


# -- wrk ------------------------------------------------------------------------------------


@dataclass
class Round:
    label: str
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str
    cpu_us: float  # the proxy's own CPU time (all its processes) per request of the round


def _latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    if not m:
        raise RuntimeError(f"no {pct}% latency in wrk's output:\n{text}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def parse_wrk(text: str) -> tuple[float, float, float, int, str]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if not rps or not total:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    problems = []
    sock = re.search(r"Socket errors: (.*)", text)
    if sock:
        problems.append("socket errors: " + sock.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        problems.append(f"{non2xx.group(1)} non-2xx/3xx")
    return (
        float(rps.group(1)),
        _latency(text, "50"),
        _latency(text, "99"),
        int(total.group(1)),
        "; ".join(problems),
    )


def wrk(
    procs: Procs,
    opts: Options,
    label: str,
    target: str,
    url: str,
    headers: dict[str, str],
    pids: list[int],
) -> Round:
    # Before and after: the target answers 200 with the backend's body (a gateway round with a
    # dead cookie would be a round of fast redirects, which wrk counts as successes).
    if not answers(url, headers):
        raise RuntimeError(f"{target} does not answer 200 at {url} before the round")
    argv = ["wrk", "-t", str(opts.wrk_threads), "-c", str(opts.connections), "-d", f"{opts.duration}s",
            "--timeout", "5s", "--latency"]  # fmt: skip
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    cpu0 = cpu_seconds(pids)
    out = procs.run(
        f"wrk-{label}-{target}".replace(" ", "_"), [*argv, url], timeout=opts.duration + 60
    )
    cpu = cpu_seconds(pids) - cpu0
    if not answers(url, headers):
        raise RuntimeError(f"{target} does not answer 200 at {url} after the round")
    rps, p50, p99, total, errors = parse_wrk(out)
    cpu_us = cpu / max(1, total) * 1e6
    log(f"{label:>10} {target:<8} {rps:10.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
        f"{cpu_us:.0f} µs CPU/request {errors}")  # fmt: skip
    return Round(label, target, rps, p50, p99, total, errors, cpu_us)


def pair(procs: Procs, opts: Options, stack: Stack, label: str, cookie: str) -> list[Round]:
    return [
        wrk(procs, opts, label, "bare", stack.bare_url + "/", {}, stack.bare_pids()),
        wrk(
            procs,
            opts,
            label,
            "gateway",
            stack.gateway_url + "/",
            {"Cookie": f"{COOKIE}={cookie}"},
            stack.gateway_pids(),
        ),
    ]


# -- stored sessions ------------------------------------------------------------------------


def redis_used_memory(port: int) -> int:
    return int(redis_cmd(port, "INFO", "memory")["used_memory"])


def fill(
    procs: Procs, stack: Stack, workdir: Path, template: dict[str, Any], first: int, count: int
) -> dict[str, Any]:
    """``count`` more genuine sealed sessions, written by parallel filler processes."""
    path = workdir / "template.json"
    path.write_text(json.dumps({"session": template}))
    parts = max(1, min(os.cpu_count() or 1, 4, count // 1000 or 1))
    share = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
    start = time.perf_counter()
    running = []
    at = first
    for i, n in enumerate(share):
        name = f"fill-{first}-{i}"
        running.append((name, procs.start(name, [sys.executable, str(ROOT / "bench" / "fill.py"), str(path),
                                                 str(stack.redis_port), PREFIX, str(at), str(n)])))  # fmt: skip
        at += n
    outs = []
    deadline = time.monotonic() + max(120.0, count / 2000)
    for name, proc in running:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} did not finish in time") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{procs.output(name)[-3000:]}")
        outs.append(json.loads(procs.output(name).strip().splitlines()[-1]))
        procs.stop(proc)
    errors = sum(o["errors"] for o in outs)
    if errors:
        raise RuntimeError(f"redis-cli reported {errors} errors while filling")
    return {"seconds": time.perf_counter() - start, "sample": outs[0]["sample"], "processes": parts}


def check_sample(stack: Stack, sample: dict[str, Any]) -> None:
    """A filled record opens with its ticket, as the gateway would open it."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=stack.redis_port)
    try:
        ticket = Ticket(bytes.fromhex(sample["ticket"][0]), bytes.fromhex(sample["ticket"][1]))
        raw = client.get(PREFIX + "s:" + ticket.store_key)
    finally:
        client.close()
    if raw is None or ticket.open_record(raw).identity.sub != sample["sub"]:
        raise RuntimeError("a filled session record does not open as the gateway would open it")


def logged_in_record(stack: Stack, cookie: str) -> tuple[Ticket, bytes]:
    """The logged-in session's ticket and its sealed record, as stored in Redis."""
    import redis

    settings = settings_of(stack)
    ring = KeyRing([decode_secret(s.get_secret_value()) for s in settings.session.cookie_secrets])
    ticket = Ticket.from_cookie(cookie, ring)
    client = redis.Redis(host="127.0.0.1", port=stack.redis_port)
    try:
        raw = client.get(PREFIX + "s:" + ticket.store_key)
    finally:
        client.close()
    assert raw is not None
    return ticket, raw


def session_template(stack: Stack, cookie: str) -> dict[str, Any]:
    ticket, raw = logged_in_record(stack, cookie)
    return dict(json.loads(ticket.open_record(raw).to_json()))


def settings_of(stack: Stack) -> Settings:
    return validate(stack.config, env={})


def stored_sessions(port: int) -> int:
    return int(redis_cmd(port, "EVAL", f"return #redis.call('keys', '{PREFIX}s:*')", "0"))


# -- memory ---------------------------------------------------------------------------------


async def idle_connections(url: str, path: str, pids: list[int], count: int) -> float:
    """RSS growth of the server processes per idle keep-alive connection (bytes)."""
    host, port = url.removeprefix("http://").split(":")
    before = rss_bytes(pids)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        conns.append((reader, writer))
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)

    try:
        async with asyncio.timeout(120):
            for i in range(0, count, 100):
                await asyncio.gather(*(one() for _ in range(min(100, count - i))))
            await asyncio.sleep(1.0)
            after = rss_bytes(pids)
    finally:
        for _, writer in conns:
            writer.close()
    return (after - before) / count


async def touch_bookkeeping(settings: Settings, count: int) -> float:
    """Bytes the gateway keeps per session it has seen (the idle-timeout touch record)."""
    import tracemalloc

    from gateway.session import Identity, Session, Tokens
    from gateway.sessions import Loaded, SessionManager
    from gateway.store.redis import RedisStore

    store = RedisStore.from_url(
        settings.session.redis_url.get_secret_value(), prefix=PREFIX + "touch:"
    )
    ring = KeyRing([decode_secret(s.get_secret_value()) for s in settings.session.cookie_secrets])
    manager = SessionManager(settings.session, store, ring, provider=None)  # type: ignore[arg-type]
    now = time.time()
    session = Session("0" * 32, Identity("x"), Tokens("t"), now, now + 3600)
    loaded = [Loaded(Ticket.new(), session) for _ in range(count)]
    for item in loaded:
        item.ticket.store_key  # noqa: B018 (computed before measuring: it is not kept)
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for item in loaded:
            await manager.touch(item)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    finally:
        await store.close()
    return (after - before) / count


def cached_session_bytes(stack: Stack, cookie: str, count: int) -> float:
    """Bytes the session cache holds per opened session (the logged-in session's record,
    opened once per entry, with its ticket and expiry), by tracemalloc over ``count``."""
    import tracemalloc

    from gateway.session_cache import SessionCache

    ticket, raw = logged_in_record(stack, cookie)
    cache = SessionCache(count, 3600.0, time.time)
    cache.set_trusted(True)
    until = time.time() + 3600
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(count):
        t = Ticket.new()
        cache.put(t.store_key, t, ticket.open_record(raw), cache.generation, until)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cache) == count
    return (after - before) / count


# -- the run --------------------------------------------------------------------------------


@dataclass
class Options:
    quick: bool
    duration: int
    rounds: int
    workers: int
    sessions: list[int]
    connections: int
    wrk_threads: int
    logins: int
    login_concurrency: int
    idle: int
    output: Path
    note: str


@dataclass
class Results:
    opts: Options
    started: str = ""
    machine: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    setup: dict[str, str] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    layers: list[Round] = field(default_factory=list)
    stored: list[dict[str, Any]] = field(default_factory=list)
    logins: dict[str, Any] = field(default_factory=dict)
    memory: list[tuple[str, str, str]] = field(default_factory=list)
    pieces: list[Any] = field(default_factory=list)
    areas: list[tuple[str, float, float]] = field(default_factory=list)
    top: list[tuple[str, str, float]] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0


async def run(opts: Options, procs: Procs, workdir: Path, res: Results) -> None:
    log(f"starting redis, backend, provider, bare proxy and gateway ({opts.workers} workers each)")
    stack = start_stack(procs, workdir, opts.workers)
    res.setup = {
        "backend": stack.backend_kind,
        "workers": str(opts.workers),
        "gateway event loop": "uvloop" if uses_uvloop(stack.gateway_pids()[-opts.workers:]) else "asyncio default loop",
        "bare proxy event loop": "uvloop" if uses_uvloop(stack.bare_pids()) else "asyncio default loop",
        "gateway": "`gateway run --workers N`, Redis store, JSON access log (to a file), metrics on",
    }  # fmt: skip
    cookie = await login(stack.gateway_url)
    if not opts.quick:
        log("logged in; warming up")
        pair(procs, Options(**{**opts.__dict__, "duration": 3}), stack, "warm-up", cookie)

    log("starting the layer gateways (public route; public route without access log)")
    layers = start_layers(procs, workdir, stack)
    for i in range(opts.rounds):
        res.rounds += pair(procs, opts, stack, f"round {i + 1}", cookie)
        for name, (url, pid) in layers.items():
            pids = [pid, *children_of(pid)]
            headers = {"Cookie": f"{COOKIE}={cookie}"}  # sent as by a browser; not read
            res.layers.append(wrk(procs, opts, f"round {i + 1}", name, url + "/", headers, pids))

    log(f"logins: {opts.logins} with {opts.login_concurrency} at a time")
    res.logins = await logins(stack, opts.logins, opts.login_concurrency)

    settings = settings_of(stack)
    log("memory: idle keep-alive connections")
    gw_conn = await idle_connections(stack.gateway_url, "/healthz", stack.gateway_pids(), opts.idle)
    bare_conn = await idle_connections(stack.bare_url, "/", stack.bare_pids(), opts.idle)
    touch = await touch_bookkeeping(settings, opts.idle)
    cached = cached_session_bytes(stack, cookie, opts.idle)
    res.memory += [
        ("gateway RSS per idle keep-alive connection", f"{gw_conn / 1024:.1f} KiB", f"{opts.idle} connections, RSS of all gateway processes before/after"),
        ("bare proxy RSS per idle keep-alive connection", f"{bare_conn / 1024:.1f} KiB", "the same, for the baseline"),
        ("gateway memory per cached session", f"{cached / 1024:.1f} KiB", f"`SessionCache` entry (opened session, ticket, expiry), tracemalloc over {opts.idle} sessions"),
        ("gateway memory per session seen (touch bookkeeping)", f"{touch:.0f} B", f"`SessionManager._touched` entry, tracemalloc over {opts.idle} sessions"),
    ]  # fmt: skip

    template = session_template(stack, cookie)
    have = stored_sessions(stack.redis_port)
    for target in sorted(opts.sessions):
        need = target - have
        row: dict[str, Any] = {"sessions": target}
        if need > 0:
            log(f"filling Redis to {target:,} sessions ({need:,} more)")
            mem0 = redis_used_memory(stack.redis_port)
            filled = fill(procs, stack, workdir, template, have, need)
            mem1 = redis_used_memory(stack.redis_port)
            check_sample(stack, filled["sample"])
            usage = {
                k: int(redis_cmd(stack.redis_port, "MEMORY", "USAGE", k) or 0)
                for k in filled["sample"]["keys"]
            }
            row.update(fill_seconds=filled["seconds"], fill_processes=filled["processes"],
                       bytes_per_session=(mem1 - mem0) / need, usage=usage)  # fmt: skip
            have = target
        row["rounds"] = pair(procs, opts, stack, f"{target:,} sessions", cookie)
        row["actual"] = have
        res.stored.append(row)

    log("per-request pieces, in-process")
    from bench.pieces import measure

    res.pieces, res.areas, res.top = await measure(settings, cookie, stack.backend_url, opts.quick)


# -- reporting ------------------------------------------------------------------------------


def _version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    m = re.search(pattern, (out.stdout + out.stderr).decode(errors="replace"))
    return m.group(1) if m else "unknown"


def describe(res: Results) -> None:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    res.machine = {"CPU": cpu, "cores": str(os.cpu_count()), "kernel": platform.release(),
                   "memory": f"{int(mem) / 1024 / 1024:.1f} GiB"}  # fmt: skip
    import aiohttp as _a
    import redis as _r

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"(\w+)")
    res.versions = {
        "Python": platform.python_version(), "aiohttp": _a.__version__, "uvloop": uv,
        "redis-py": _r.__version__,
        "redis-server": _version(["redis-server", "--version"], r"v=([\d.]+)"),
        "nginx": _version([nginx_binary() or "nginx", "-v"], r"nginx/([\d.]+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (?:debian/)?([\d.]+)"), "gateway commit": commit,
    }  # fmt: skip


def _median(rounds: list[Round], target: str, attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in rounds if r.target == target)


def render(res: Results) -> str:
    o = res.opts
    out = ["# Benchmark results", ""]
    if o.note:
        out += [f"> {o.note}", ""]
    cmd = (
        "bench/run"
        + ("" if not o.quick else " --quick")
        + (
            f" --duration {o.duration} --rounds {o.rounds} --workers {o.workers}"
            f" --sessions {','.join(map(str, o.sessions))} --connections {o.connections}"
            f" --logins {o.logins} --idle {o.idle}"
        )
    )
    out += [f"Run {res.started} with `{cmd.strip()}` in {res.seconds:.0f} s. "
            f"Load average before: {res.load_before}; after: {res.load_after}.", ""]  # fmt: skip
    out += ["## Machine", "", "| " + " | ".join(res.machine) + " |", "|" + "---|" * len(res.machine),
            "| " + " | ".join(res.machine.values()) + " |", ""]  # fmt: skip
    out += ["## Versions", "", "| " + " | ".join(res.versions) + " |", "|" + "---|" * len(res.versions),
            "| " + " | ".join(res.versions.values()) + " |", ""]  # fmt: skip
    out += ["## Set-up", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in res.setup.items()]
    out += [f"| wrk | {o.connections} connections, {o.wrk_threads} thread(s), {o.duration} s a round, "
            f"{o.rounds} rounds alternating bare → gateway |", ""]  # fmt: skip

    out += ["## Throughput: the gateway against the bare aiohttp proxy", ""]
    if res.rounds:
        b_rps, g_rps = _median(res.rounds, "bare", "rps"), _median(res.rounds, "gateway", "rps")
        b_p99, g_p99 = (
            _median(res.rounds, "bare", "p99_ms"),
            _median(res.rounds, "gateway", "p99_ms"),
        )
        b_p50, g_p50 = (
            _median(res.rounds, "bare", "p50_ms"),
            _median(res.rounds, "gateway", "p50_ms"),
        )
        b_cpu, g_cpu = (
            _median(res.rounds, "bare", "cpu_us"),
            _median(res.rounds, "gateway", "cpu_us"),
        )
        out += ["| target | req/s (median) | p50 ms | p99 ms | CPU µs/request | gateway ÷ bare |",
                "|---|---|---|---|---|---|",
                f"| bare aiohttp proxy | {b_rps:,.0f} | {b_p50:.2f} | {b_p99:.2f} | {b_cpu:,.0f} | 1.00 |",
                f"| gateway, valid session | {g_rps:,.0f} | {g_p50:.2f} | {g_p99:.2f} | {g_cpu:,.0f} | "
                f"**{g_rps / b_rps:.2f}** (p99 {g_p99 / b_p99:.2f}x, CPU per request {g_cpu / b_cpu:.2f}x) |", "",
                "*CPU µs/request*: utime+stime of all the proxy's processes over the round, divided by "
                "its requests. Unlike req/s it does not depend on how much CPU other processes left "
                f"free; bare ÷ gateway CPU per request ({b_cpu / g_cpu:.2f} here) is the throughput "
                "ratio to expect on a quiet machine where both are CPU-bound.", ""]  # fmt: skip
        out += every_round(res.rounds)

    if res.rounds and res.layers:
        out += layers_table(res)

    out += ["## Stored sessions", "", "Redis filled with genuine sealed records (random ids, the "
            "logged-in session's size), then one bare and one gateway round.", "",
            "| sessions in Redis | bare req/s | gateway req/s | gateway ÷ bare | gateway p99 ms | "
            "gateway CPU µs/request | "
            "fill time | Redis bytes per session (INFO delta) | MEMORY USAGE of one session's keys |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in res.stored:
        bare, gw = row["rounds"]
        usage = row.get("usage")
        usage_text = (
            " + ".join(f"{k.split(':')[1]}: {v}" for k, v in usage.items())
            + f" = {sum(usage.values())} B"
            if usage
            else "-"
        )
        fill_text = (
            f"{row['fill_seconds']:.1f} s ({row['fill_processes']} proc.)"
            if "fill_seconds" in row
            else "-"
        )
        per = f"{row['bytes_per_session']:,.0f}" if "bytes_per_session" in row else "-"
        out.append(f"| {row['actual']:,} | {bare.rps:,.0f} | {gw.rps:,.0f} | {gw.rps / bare.rps:.2f} | "
                   f"{gw.p99_ms:.2f} | {gw.cpu_us:,.0f} | {fill_text} | {per} | {usage_text} |")  # fmt: skip
    out.append("")

    lg = res.logins
    if lg:
        out += ["## Logins", "", "| logins | at a time | logins/s | gateway CPU per login |",
                "|---|---|---|---|",
                f"| {lg['logins']} | {lg['concurrency']} | {lg['per_second']:.1f} | {lg['gateway_cpu_ms']:.1f} ms |", "",
                "Full browser flow scripted over HTTP: /oauth2/start → provider authorize, sign-in form, "
                "consent → /oauth2/callback → the first proxied page. CPU: utime+stime of all gateway "
                "processes (/proc), before and after, divided by the logins.", ""]  # fmt: skip

    out += ["## Memory", "", "| what | value | how |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in res.memory]
    out.append("")

    if res.pieces:
        out += ["## Per-request pieces", "",
                "In-process, the gateway's real functions in `timeit`-style loops (best of 5), against "
                "the benchmark's Redis and nginx; see bench/README.md for how to read it.", "",
                "| piece | µs per call | what it covers |", "|---|---|---|"]  # fmt: skip
        for p in res.pieces:
            micros = "n/a" if p.micros != p.micros else f"{p.micros:,.1f}"
            out.append(f"| {p.name} | {micros} | {p.covers} |")
        out.append("")
    if res.areas:
        out += ["## Where a whole request's time goes (profiled)", "",
                "The in-process requests above again, under cProfile: time per request by the part "
                "of the stack the code belongs to (the in-process client's share is in both columns "
                "alike). The profiler slows Python code more than C code: compare the columns, do "
                "not add them to the table above.", "",
                "| part | bare proxy µs/request | gateway µs/request | gateway extra |",
                "|---|---|---|---|"]  # fmt: skip
        for area, b, g in res.areas:
            out.append(f"| {area} | {b:,.0f} | {g:,.0f} | {g - b:+,.0f} |")
        tb, tg = sum(a[1] for a in res.areas), sum(a[2] for a in res.areas)
        out += [f"| **total** | {tb:,.0f} | {tg:,.0f} | {tg - tb:+,.0f} |", ""]
    if res.top:
        out += ["The functions with the most own time in the gateway's requests (profiled as above; "
                "the client's functions are among them):", "",
                "| function | part | µs/request |", "|---|---|---|"]  # fmt: skip
        out += [f"| {f} | {a} | {m:,.1f} |" for f, a, m in res.top]
        out.append("")
    return "\n".join(out)


def layers_table(res: Results) -> list[str]:
    """CPU per request of the bare proxy, the layer gateways and the full gateway (medians)."""
    bare = _median(res.rounds, "bare", "cpu_us")
    skeleton = _median(res.layers, "public, no log", "cpu_us")
    logged = _median(res.layers, "public", "cpu_us")
    full = _median(res.rounds, "gateway", "cpu_us")
    budget = bare / 0.85
    out = ["## The gateway's CPU per request, layer by layer", "",
           "The same gateway with parts of the hot path switched off by configuration, each "
           "its own `gateway run` with the same workers, in the same rounds (median CPU µs per "
           "request; see bench/README.md).", "",
           "| target | CPU µs/request | added by the layer | what the layer is |",
           "|---|---|---|---|",
           f"| bare aiohttp proxy | {bare:,.0f} | | aiohttp's server and client, one handler |",
           f"| gateway, public route, access log off | {skeleton:,.0f} | {skeleton - bare:+,.0f} | "
           "the gateway's pipeline without authentication or logging: middlewares, request id, "
           "path normalisation, route match, header rules both ways, metrics, the relay, "
           "`gateway run`'s server |",
           f"| + the access log | {logged:,.0f} | {logged - skeleton:+,.0f} | one JSON line a request |",
           f"| + authentication (valid session) | {full:,.0f} | {full - logged:+,.0f} | cookie, "
           "session cache, refresh and policy checks, idle touch, identity headers, the access "
           "token header |", "",
           f"The 0.85x goal allows the gateway {budget:,.0f} µs per request (the bare proxy's "
           f"{bare:,.0f} ÷ 0.85), {budget - bare:,.0f} µs more than the bare proxy.", ""]  # fmt: skip
    return out + every_round(res.layers)


def every_round(rounds: list[Round]) -> list[str]:
    out = ["Every round:", "",
           "| round | target | req/s | p50 ms | p99 ms | CPU µs/request | requests | errors |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    out += [f"| {r.label} | {r.target} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.cpu_us:,.0f} | {r.requests:,} | {r.errors or 'none'} |" for r in rounds]  # fmt: skip
    return [*out, ""]


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/run", description="Benchmark the gateway against a bare aiohttp proxy."
    )
    p.add_argument("--quick", action="store_true", help="smallest settings, a few seconds (CI)")
    p.add_argument("--duration", type=int, help="seconds per wrk round (default 10; quick 1)")
    p.add_argument(
        "--rounds", type=int, help="alternating bare/gateway rounds (default 3; quick 1)"
    )
    p.add_argument("--workers", type=int, help="processes of each proxy (default 2; quick 1)")
    p.add_argument(
        "--sessions",
        help="stored-session counts, comma-separated (default 1000,1000000; quick 100)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--logins", type=int, help="logins to time (default 200; quick 3)")
    p.add_argument("--login-concurrency", type=int, default=8, help="logins at a time (default 8)")
    p.add_argument(
        "--idle", type=int, help="idle connections for the memory figure (default 1000; quick 20)"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "bench" / "RESULTS.md",
        help="where to write the results",
    )
    p.add_argument("--note", default="", help="a line to put at the top of the results")
    a = p.parse_args(argv)
    q = a.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    sessions = [
        int(s.replace("_", "")) for s in pick(a.sessions, "1000,1000000", "100").split(",") if s
    ]
    opts = Options(q, pick(a.duration, 10, 1), pick(a.rounds, 3, 1), pick(a.workers, 2, 1), sessions,
                   a.connections, a.wrk_threads, pick(a.logins, 200, 3), min(a.login_concurrency, pick(a.logins, 200, 3)),
                   pick(a.idle, 1000, 20), a.output, a.note)  # fmt: skip
    if min(opts.duration, opts.rounds, opts.workers, opts.connections, opts.logins, opts.idle) < 1:
        p.error("durations, rounds, workers, connections, logins and --idle must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (bench/run installs it with apt-get)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    res = Results(opts, started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    res.load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        procs = Procs(Path(tmp))
        try:
            describe(res)
            try:
                import uvloop

                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            runner(run(opts, procs, Path(tmp), res))
        except KeyboardInterrupt:
            log("interrupted: stopping everything")
            return 130
        except Exception as exc:
            log(f"failed: {exc}")
            for name, _ in procs.items:
                if name.startswith("gateway"):
                    log("gateway log tail:\n" + procs.output(name)[-2000:])
            raise
        finally:
            procs.stop_all()
    res.seconds = time.perf_counter() - start
    res.load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = render(res)
    opts.output.write_text(text + "\n")
    print(text)
    log(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
