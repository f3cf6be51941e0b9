"""``gateway run``: the listening socket, slow-client bounds, drain, reload and workers.

- :class:`GatewayProtocol` is aiohttp's ``RequestHandler`` plus a header timer: a connection
  that has not sent a whole request head ``server.header_timeout`` after it opened (or after
  the first byte of its next request) is closed. Idle keep-alive connections are bounded by
  ``server.keepalive_timeout`` (aiohttp's own timer) and each process serves at most
  ``server.max_connections`` connections; beyond that a new one is closed at once.
- :class:`Gateway` serves one socket. Its handler passes each request to the current
  *generation* (an app built by ``create_app``); SIGHUP builds a new generation from the
  re-read file and swaps it in for new requests, while requests already running finish on
  the old one, whose clients are closed when its last request is done. The session store and
  the metrics outlive generations, so no session and no count is lost.
- SIGTERM drains: ``/readyz`` answers 503, the listener closes, idle connections are closed,
  running requests finish (up to ``server.shutdown_timeout``), then the process exits 0.
- :func:`run_workers` is the ``--workers N`` parent: it binds the socket once, forks N
  workers that inherit it, forwards TERM/INT/HUP, restarts a worker that dies (with a
  backoff), and sums metrics over workers. Workers die with their parent (PR_SET_PDEATHSIG,
  and a parent-pid check where that is unavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from types import FrameType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway import __version__, paths
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import flush_logs

log = logging.getLogger("gateway.server")

__all__ = ["Gateway", "GatewayProtocol", "bind_socket", "run_single", "run_workers"]

_PR_SET_PDEATHSIG = 1
_RESTART_BACKOFF = (0.5, 30.0)  # first delay, ceiling (doubling in between)
_STABLE_AFTER = 60.0  # a worker that lived this long restarts after the first delay again
_LIMIT_LOG_EVERY = 10.0
# The cyclic collector's youngest generation runs after this many net allocations (Python's
# default is 700): a request allocates hundreds of objects, and with dozens in flight the
# default ran a collection every few requests over objects still in use (about 5% of a
# worker's CPU under load). The hot path makes no cyclic garbage.
_GC_YOUNG_THRESHOLD = 10_000
_RESTART_ONLY_SERVER_KEYS = (
    "host",
    "port",
    "reuse_port",
    "header_timeout",
    "keepalive_timeout",
    "max_connections",
    "shutdown_timeout",
)


class PortInUse(Exception):
    """The listen address is taken (by another gateway or anything else)."""


# -- slow clients -------------------------------------------------------------------------------


class GatewayProtocol(RequestHandler):
    """aiohttp's connection handler with a request-head deadline and a connection bound."""

    __slots__ = ("_header_handle", "_header_timeout", "_max_connections")

    def __init__(
        self, manager: GatewayServer, *, header_timeout: float, max_connections: int, **kw: Any
    ) -> None:
        super().__init__(manager, **kw)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._header_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, GatewayServer) and manager.over_limit(self._max_connections):
            self.force_close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if (
            data
            and self._header_handle is None
            and self._payload_parser is None
            and not self._upgraded
            and not self._request_in_progress
            and not self._messages
        ):
            # The first byte of the next request on a kept-alive connection.
            self._arm_header_timer()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_handle = self._loop.call_later(self._header_timeout, self._header_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_expired(self) -> None:
        self._header_handle = None
        if self._request_in_progress or self._messages or self._upgraded:
            return
        log.debug("closed a connection whose request head was not complete in time")
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser refused: a plain answer that echoes nothing it was sent.

        aiohttp's own answer quotes the offending line (a cookie or an ``Authorization``
        header, say) in its body and logs it with a traceback; neither may carry a secret.
        """
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        log.info(
            "refused a malformed request from %s: %s (%d)",
            request.remote, type(exc).__name__, status,
        )  # fmt: skip
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has started; the connection is closed")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Bad Request"
        resp = web.Response(
            status=status,
            text=f"{status} {phrase}\n\nThe request could not be read.\n",
            content_type="text/plain",
        )
        resp.force_close()
        return resp


class GatewayServer(web.Server):
    """aiohttp's low-level server, making :class:`GatewayProtocol` connections."""

    def __init__(self, *args: Any, header_timeout: float, max_connections: int, **kw: Any):
        super().__init__(*args, **kw)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._limit_logged = 0.0

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(
            self,
            loop=self._loop,
            header_timeout=self._header_timeout,
            max_connections=self._max_connections,
            **self._kwargs,
        )

    def over_limit(self, limit: int) -> bool:
        if len(self._connections) <= limit:
            return False
        now = time.monotonic()
        if now - self._limit_logged >= _LIMIT_LOG_EVERY:
            self._limit_logged = now
            log.warning("server.max_connections (%d) reached: closing new connections", limit)
        return True


# -- one process serving one socket --------------------------------------------------------------


@dataclass(eq=False)
class _Generation:
    """One app built from one version of the config, and its running requests."""

    app: web.Application
    settings: Settings
    running: int = 0
    retired: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def _readyz_draining() -> web.Response:
    resp = web.json_response(
        {"status": "not ready", "checks": {"shutdown": "draining"}},
        status=503,
        headers={"Cache-Control": "no-store"},
    )
    resp.force_close()
    return resp


class Gateway:
    """Serve ``sock`` with the app of the current config; reload and drain on signals."""

    def __init__(self, settings: Settings, config_path: str | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.draining = False
        self.stopped = asyncio.Event()
        self._current: _Generation | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._runner: web.ServerRunner | None = None
        self._server: GatewayServer | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()

    async def start(self, sock: socket.socket) -> None:
        from gateway.metrics import Metrics, start_metrics_server
        from gateway.store import open_store

        self.store = open_store(self.settings.session)
        self.metrics = Metrics()
        self._current = await self._start_generation(self.settings)
        s = self.settings.server
        app = self._current.app
        self._server = GatewayServer(
            self._dispatch,  # type: ignore[arg-type]
            request_factory=self._make_request,
            handler_cancellation=True,
            header_timeout=s.header_timeout,
            max_connections=s.max_connections,
            keepalive_timeout=s.keepalive_timeout,
            access_log=None,
            **app._handler_args,
        )
        self._runner = web.ServerRunner(self._server, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=1024).start()
        self._metrics_runner = await start_metrics_server(self.settings, self.metrics)

    async def _start_generation(self, settings: Settings) -> _Generation:
        from gateway.app import create_app

        app = create_app(settings, store=self.store, metrics=self.metrics, shared=True)
        # What web.AppRunner.setup does for its one app.
        app._set_loop(asyncio.get_running_loop())
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        return _Generation(app, settings)

    def _make_request(self, *args: Any) -> web.BaseRequest:
        assert self._current is not None
        return self._current.app._make_request(*args)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.draining and request.path == paths.READYZ:
            return _readyz_draining()
        gen = self._current
        assert gen is not None
        gen.running += 1
        try:
            resp = await gen.app._handle(request)
        finally:
            gen.running -= 1
            if gen.retired and gen.running == 0:
                self._close_later(gen)
        if self.draining and not resp.prepared and not request.protocol._messages:
            # Connection: close, so the client does not reuse it (unless it has pipelined
            # requests already received: they are answered first).
            resp.force_close()
        return resp

    # -- reload --

    async def reload(self) -> bool:
        """Read the config file again; swap it in when valid. False when it was refused."""
        async with self._reload_lock:
            if self.draining:
                return False
            new = read_config(self.config_path)
            if new is None:
                return False
            for key in restart_only_changes(self.settings, new):
                log.warning("reload: %s changed; it takes effect at the next restart", key)
            try:
                gen = await self._start_generation(new)
            except Exception as exc:  # a config pydantic accepted but the app could not build
                log.error("reload refused: %s; the running config stays", exc)
                return False
            old, self._current = self._current, gen
            self.settings = new
            logging.getLogger().setLevel(new.observability.log_level.upper())
            if old is not None:
                old.retired = True
                if old.running == 0:
                    self._close_later(old)
            log.info("config reloaded from %s (%d routes)", self.config_path, len(new.routes))
            return True

    def _close_later(self, gen: _Generation) -> None:
        if gen.closed.is_set():
            return
        gen.closed.set()
        task = asyncio.create_task(_close_generation(gen))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- drain --

    async def drain(self) -> None:
        """SIGTERM: readiness 503, stop accepting, let running requests finish, clean up."""
        if self.draining:
            return
        self.draining = True
        timeout = self.settings.server.shutdown_timeout
        log.info("SIGTERM: draining (readiness 503, up to %gs for running requests)", timeout)
        runner, server = self._runner, self._server
        assert runner is not None and server is not None
        for site in list(runner.sites):
            await site.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            busy = 0
            for conn in server.connections:
                if conn._request_in_progress or conn._messages:
                    busy += 1
                elif conn._waiter is not None:
                    conn.force_close()  # idle: nothing is lost
            if (busy == 0 and not server.connections) or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if busy:
            log.warning("drain: %d requests still running after %gs, cancelled", busy, timeout)
        await runner.cleanup()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._current is not None:
            self._close_later(self._current)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.store.close()
        log.info("drained; exiting")
        self.stopped.set()


async def _close_generation(gen: _Generation) -> None:
    try:
        await gen.app.shutdown()
        await gen.app.cleanup()
    except Exception:
        log.exception("closing the previous config's clients failed")
    # The old app was frozen with everything else: unfreeze so its cycles can be freed.
    gc.unfreeze()
    freeze_heap()


def freeze_heap() -> None:
    """Collect once, then move every object that exists now (modules, settings, the app, its
    clients and compiled routes) out of the cyclic garbage collector's sight (``gc.freeze``),
    and let the youngest generation grow to ``_GC_YOUNG_THRESHOLD`` before a collection.

    Requests allocate enough for the collector to run often; each full collection used to
    walk this whole long-lived heap (about 14% of a worker's CPU under load, and the p99's
    pauses). Called once the app serves, and again after a reload retired the old app.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Keys a reload cannot apply to a running process (they name sockets or the store)."""
    changed = [
        f"server.{k}"
        for k in _RESTART_ONLY_SERVER_KEYS
        if getattr(old.server, k) != getattr(new.server, k)
    ]
    if old.observability.metrics_listen != new.observability.metrics_listen:
        changed.append("observability.metrics_listen")
    if old.observability.log_format != new.observability.log_format:
        changed.append("observability.log_format")
    o, n = old.session, new.session
    if (o.store, o.redis_url, o.key_prefix) != (n.store, n.redis_url, n.key_prefix):
        changed.append("session.store/redis_url/key_prefix")
    return changed


# -- sockets -------------------------------------------------------------------------------------


def bind_socket(settings: Settings) -> socket.socket:
    """The listening socket; :class:`PortInUse` when another process has the address.

    Without ``server.reuse_port`` the socket does not take SO_REUSEPORT, so the bind fails
    even against a gateway that set it: two gateways never split one port by accident.
    """
    s = settings.server
    infos = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if s.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise PortInUse(f"cannot listen on {s.host}:{s.port}: {exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _raise_fd_limit(settings: Settings) -> None:
    """Room for max_connections clients plus as many upstream sockets."""
    want = 2 * settings.server.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want or soft == resource.RLIM_INFINITY:
        return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < want:
        log.warning(
            "open-file limit %d is low for server.max_connections %d",
            target,
            settings.server.max_connections,
        )


def startup_line(settings: Settings, sock: socket.socket, workers: int) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "gateway %s listening on http://%s:%d (workers: %d, provider: %s, store: %s)",
        __version__,
        shown,
        port,
        workers,
        settings.provider.issuer
        if settings.provider is not None
        else ", ".join(f"{ref.id}={ref.settings.issuer}" for ref in settings.provider_refs),
        settings.session.store,
    )


async def _serve(
    settings: Settings,
    config_path: str | None,
    sock: socket.socket,
    parent_pid: int | None = None,
) -> None:
    gateway = Gateway(settings, config_path)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[Any]] = set()
    # Signals that arrive while the app starts (the provider may be slow) wait for it.
    pending: set[signal.Signals] = set()
    started = False

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_term() -> None:
        if started:
            spawn(gateway.drain())
        else:
            pending.add(signal.SIGTERM)

    def on_hup() -> None:
        if started:
            spawn(gateway.reload())
        else:
            pending.add(signal.SIGHUP)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await gateway.start(sock)
    freeze_heap()
    started = True
    if signal.SIGHUP in pending:
        on_hup()
    if signal.SIGTERM in pending:
        on_term()
    if parent_pid is not None:
        watcher = asyncio.ensure_future(_watch_parent(parent_pid, on_term))
    await gateway.stopped.wait()
    if parent_pid is not None:
        watcher.cancel()


async def _watch_parent(parent_pid: int, on_orphaned: Any) -> None:
    """Where PR_SET_PDEATHSIG is unavailable: drain once the parent is gone."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 (nothing to wait on but the clock)
        await asyncio.sleep(1.0)
    log.warning("the gateway parent process is gone: draining")
    on_orphaned()


def run_single(settings: Settings, config_path: str | None) -> int:
    """``gateway run`` with one process."""
    sock = _listen(settings, 1)
    if sock is None:
        return 1
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop handles it
    try:
        asyncio.run(_serve(settings, config_path, sock))
    finally:
        sock.close()
        flush_logs()
    return 0


def _listen(settings: Settings, workers: int) -> socket.socket | None:
    """Bind, or print one clear line and return None when the address is taken."""
    try:
        sock = bind_socket(settings)
    except PortInUse as exc:
        print(
            f"gateway run: {exc} (is another gateway running? set server.reuse_port: true to "
            "share the port on purpose)",
            file=sys.stderr,
        )
        return None
    _raise_fd_limit(settings)
    startup_line(settings, sock, workers)
    return sock


def read_config(path: str | None) -> Settings | None:
    """The re-read config file, or None after logging each of its problems on one line."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        log.error("reload refused: the running config stays")
        return None


# -- the --workers parent ------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)


def _worker_main(
    settings: Settings, config_path: str | None, sock: socket.socket, parent_pid: int
) -> None:
    # Until the loop takes them over: TERM/INT end a worker that serves nothing yet, a HUP
    # (the parent forwarding a reload) must not.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    try:
        asyncio.run(_serve(settings, config_path, sock, parent_pid))
    finally:
        flush_logs()  # multiprocessing ends a worker with os._exit: no atexit flush


@dataclass
class _Slot:
    process: multiprocessing.process.BaseProcess | None = None
    started: float = 0.0
    delay: float = _RESTART_BACKOFF[0]
    restart_at: float | None = None


def run_workers(settings: Settings, config_path: str | None, workers: int) -> int:
    """The parent of ``--workers N``: it serves nothing itself."""
    from prometheus_client import multiprocess

    from gateway.metrics import enable_multiprocess

    sock = _listen(settings, workers)
    if sock is None:
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    enable_multiprocess(metrics_dir)
    context = multiprocessing.get_context("fork")
    parent_pid = os.getpid()
    flags = {"stop": False, "hup": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        flags["hup" if signum == signal.SIGHUP else "stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    slots = [_Slot() for _ in range(workers)]

    def start(index: int) -> None:
        slot = slots[index]
        proc = context.Process(
            target=_worker_main,
            args=(settings, config_path, sock, parent_pid),
            name=f"gateway-worker-{index}",
        )
        proc.start()
        slot.process, slot.started, slot.restart_at = proc, time.monotonic(), None
        log.info("worker %d started (pid %s)", index, proc.pid)

    try:
        for i in range(workers):
            start(i)
        while not flags["stop"]:
            sentinels = [s.process.sentinel for s in slots if s.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            if flags["hup"]:
                flags["hup"] = False
                settings = _parent_reload(settings, config_path, slots)
            now = time.monotonic()
            for i, slot in enumerate(slots):
                proc = slot.process
                if proc is not None and not proc.is_alive():
                    multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                    if now - slot.started >= _STABLE_AFTER:
                        slot.delay = _RESTART_BACKOFF[0]
                    log.warning(
                        "worker %d (pid %s) exited with %s; restarting in %gs",
                        i,
                        proc.pid,
                        proc.exitcode,
                        slot.delay,
                    )
                    slot.process, slot.restart_at = None, now + slot.delay
                    slot.delay = min(slot.delay * 2, _RESTART_BACKOFF[1])
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    start(i)
        _stop_workers(slots, settings.server.shutdown_timeout + 5.0)
    finally:
        for slot in slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped; exiting")
    return 0


def _parent_reload(settings: Settings, config_path: str | None, slots: list[_Slot]) -> Settings:
    """Check the file once (problems logged here, once) and have every worker reload it."""
    new = read_config(config_path)
    if new is None:
        return settings
    for slot in slots:
        if slot.process is not None and slot.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGHUP)
    return new  # a worker restarted from now on starts with it


def _stop_workers(slots: list[_Slot], timeout: float) -> None:
    log.info("stopping: draining %d workers", sum(s.process is not None for s in slots))
    for slot in slots:
        if slot.process is not None and slot.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for slot in slots:
        if slot.process is not None:
            slot.process.join(max(0.0, deadline - time.monotonic()))
