"""Real Redis topologies on loopback for the ``topology`` tests: a primary with a replica and
three sentinels, and a six-node cluster (three primaries, three replicas), each made of
Debian's ``redis-server`` / ``redis-sentinel`` processes on free ports in a temporary folder.

Every data node writes an append-only file, so ``stop_all()`` then ``start_all()`` is a real
outage that loses nothing. Nodes are stopped by their PID only.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.support.ports import free_port

SENTINEL_SERVICE = "gwprimary"
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout and sentinel down-after: failover in seconds


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.3) as s:
        s.settimeout(0.5)
        s.sendall(b"PING\r\n")
        # An instance that requires a password answers NOAUTH: it is up all the same.
        return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    return False


def _info(port: int, section: str, password: str | None = None) -> dict[str, Any]:
    """INFO of one node ({} when it does not answer)."""
    client = redis.Redis(port=port, password=password, socket_timeout=1, socket_connect_timeout=1)
    try:
        return dict(client.info(section))
    except redis.RedisError:
        return {}
    finally:
        client.close()


def _role(port: int, password: str | None = None) -> str:
    return str(_info(port, "replication", password).get("role", ""))


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Node:
    """One redis-server (or redis-sentinel) process with fixed arguments and port."""

    port: int
    args: list[str]
    binary: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: _answers(self.port), f"redis on port {self.port}")

    def stop(self) -> None:
        """SIGTERM (the node flushes its append-only file) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the node dies as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    return free_port(with_offset=10000)


def _server_binary() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def _data_node(
    folder: Path, name: str, *extra: str, password: str | None = None, port: int | None = None
) -> Node:
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--dbfilename", f"{name}.rdb", "--appendonly", "yes",
            "--appendfilename", f"{name}.aof", "--appendfsync", "always", "--save", "",
            "--daemonize", "no", "--loglevel", "warning", *auth, *extra]  # fmt: skip
    return Node(port, args, _server_binary())


@dataclass
class SentinelSet:
    """A primary, its replica and three sentinels watching them."""

    primary: Node
    replica: Node
    sentinels: list[Node]
    folder: Path
    password: str | None = None
    sentinel_password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{SENTINEL_SERVICE}"

    def nodes(self) -> list[Node]:
        return [self.primary, self.replica, *self.sentinels]

    def start_all(self) -> None:
        for node in self.nodes():
            node.start()
        wait_for(self._replica_in_sync, "the replica to sync")
        wait_for(self._sentinels_agree, "the sentinels to see primary and replica")

    def stop_all(self) -> None:
        for node in self.nodes():
            node.stop()

    def current_primary(self) -> Node:
        for node in (self.primary, self.replica):
            if node.proc is not None and _role(node.port, self.password) == "master":
                return node
        raise RuntimeError("no primary")

    def _replica_in_sync(self) -> bool:
        info = _info(self.replica.port, "replication", self.password)
        return info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            master = _info(sentinel.port, "sentinel", self.sentinel_password).get("master0", {})
            if not (isinstance(master, dict) and master.get("slaves") == 1
                    and master.get("sentinels") == 3):  # fmt: skip
                return False
        return True

    def wait_replicated(self) -> None:
        """Block until the replica has every write the primary took (before a failover)."""
        client = redis.Redis(port=self.current_primary().port, password=self.password)
        try:
            assert client.execute_command("WAIT", 1, 3000) == 1
        finally:
            client.close()

    def promoted(self, old: Node) -> bool:
        others = [n for n in (self.primary, self.replica) if n is not old]
        return any(_role(n.port, self.password) == "master" for n in others)

    def close(self) -> None:
        for node in self.nodes():
            node.kill()


def start_sentinel_set(
    folder: Path, password: str | None = None, sentinel_password: str | None = None
) -> SentinelSet:
    primary = _data_node(folder, "primary", password=password)
    replica = _data_node(
        folder, "replica", "--replicaof", "127.0.0.1", str(primary.port), password=password
    )
    sentinels = []
    for i in range(3):
        port = free_port()
        conf = folder / f"sentinel-{i}.conf"
        lines = [
            f"port {port}", "bind 127.0.0.1", f"dir {folder}",
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {NODE_TIMEOUT_MS}",
            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000",
            f"sentinel parallel-syncs {SENTINEL_SERVICE} 1",
        ]  # fmt: skip
        if password:
            lines.append(f"sentinel auth-pass {SENTINEL_SERVICE} {password}")
        if sentinel_password:
            lines += [
                f"requirepass {sentinel_password}",
                f"sentinel sentinel-pass {sentinel_password}",
            ]
        conf.write_text("\n".join(lines) + "\n")
        binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        sentinels.append(Node(port, [str(conf), "--loglevel", "warning"], binary))
    topology = SentinelSet(primary, replica, sentinels, folder, password, sentinel_password)
    try:
        topology.start_all()
    except BaseException:
        topology.close()
        raise
    return topology


@dataclass
class RedisClusterSet:
    """Six cluster nodes: the first three are the primaries, each with one replica."""

    nodes: list[Node]
    folder: Path
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start_all(self) -> None:
        for node in self.nodes:
            node.start()
        wait_for(self.healthy, "the cluster to serve every slot")

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()

    def healthy(self) -> bool:
        return all(self._state_ok(n) for n in self.nodes if n.proc is not None)

    def _state_ok(self, node: Node) -> bool:
        client = redis.Redis(
            port=node.port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            info = client.cluster("INFO")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return bool(info.get("cluster_state") == "ok" and
                    int(info.get("cluster_slots_ok", 0)) == 16384)  # fmt: skip

    def replicas_in_sync(self) -> bool:
        infos = [_info(n.port, "replication", self.password) for n in self.nodes if n.proc]
        replicas = [i for i in infos if i.get("role") == "slave"]
        return len(replicas) == 3 and all(i.get("master_link_status") == "up" for i in replicas)

    def primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.proc and _role(n.port, self.password) == "master"]

    def wait_replicated(self) -> None:
        # After a restart of every node the replicas resynchronise first (a full sync on a
        # busy machine can outlast WAIT's own timeout): wait for their links, then for each
        # primary's writes to reach its replica.
        wait_for(self.replicas_in_sync, "the cluster replicas to sync")
        for node in self.primaries():
            client = redis.Redis(port=node.port, password=self.password)
            try:
                assert client.execute_command("WAIT", 1, 10000) == 1
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(folder: Path, password: str | None = None) -> RedisClusterSet:
    nodes = [
        _data_node(folder, f"node-{i}", "--cluster-enabled", "yes",
                   "--cluster-config-file", str(folder / f"nodes-{i}.conf"),
                   "--cluster-node-timeout", str(NODE_TIMEOUT_MS), port=cluster_port(),
                   password=password)
        for i in range(6)
    ]  # fmt: skip
    cluster = RedisClusterSet(nodes, folder, password=password)
    try:
        for node in nodes:
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run(
            [cli, *(["-a", password, "--no-auth-warning"] if password else []),
             "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        wait_for(cluster.healthy, "the cluster to serve every slot")
        wait_for(cluster.replicas_in_sync, "the cluster replicas to sync")
    except BaseException:
        cluster.close()
        raise
    return cluster
