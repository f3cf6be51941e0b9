"""Redis AUTH (a password, an ACL user) and TLS (``rediss://`` with ``session.redis_ca_file``)
against real ``redis-server`` processes; Sentinel with different sentinel and data-node
passwords (marker ``topology``). A wrong secret is a ``StoreError`` (a 503) whose message and
log never carry the password.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import StoreError
from gateway.store.base import SessionMeta
from gateway.store.redis import RedisOptions, RedisStore
from tests.support.ports import free_port
from tests.topology import Node, start_cluster, start_sentinel_set

PASSWORD = "s3cret-Redis-pw"
ACL_PASSWORD = "acl-user-pw-123"


def server(tmp_path: Path, *args: str) -> Iterator[Node]:
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    node = Node(port, ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--dir", str(tmp_path), "--loglevel", "warning", *args], binary)  # fmt: skip
    if "--tls-port" in args:
        node.args = [a if a != "TLSPORT" else str(port) for a in node.args]
        node.args += ["--port", "0"]
        node.proc = subprocess.Popen([binary, *node.args], stdout=subprocess.DEVNULL)
        # No plain port to PING: the store's own TLS round trip below proves it is up.
    else:
        node.args += ["--port", str(port)]
        node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[Node]:
    acl = ["gwuser", "on", f">{ACL_PASSWORD}", "~gw*", "&*", "+@all"]
    yield from server(tmp_path, "--requirepass", PASSWORD, "--user", *acl)


def meta(key: str = "k1") -> SessionMeta:
    return SessionMeta(key=key, sub="alice", provider_sid=None, created_at=1.0, expires_at=2.0)


async def round_trip(url: str, options: RedisOptions | None = None) -> None:
    store = RedisStore.from_url(url, prefix="gw:auth:", options=options)
    try:
        await store.save(meta(), b"v1", 60)
        assert await store.load("k1") == b"v1"
        assert await store.replace(meta(), b"v2", 60, expected=b"v1") is True
        assert [m.key async for m in store.all_sessions()] == ["k1"]
        await store.ping()
        await store.delete("k1")
        assert await store.load("k1") is None
    finally:
        await store.close()


async def refused(url: str, caplog: pytest.LogCaptureFixture, secret: str) -> str:
    caplog.set_level(logging.WARNING, logger="gateway.store")
    store = RedisStore.from_url(url, prefix="gw:auth:")
    try:
        with pytest.raises(StoreError) as err:
            await store.load("k1")
    finally:
        await store.close()
    assert secret not in str(err.value)
    assert all(secret not in r.getMessage() for r in caplog.records)
    return str(err.value)


async def test_password_and_acl_user(auth_redis: Node, caplog: pytest.LogCaptureFixture) -> None:
    port = auth_redis.port
    await round_trip(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    await round_trip(f"redis://gwuser:{ACL_PASSWORD}@127.0.0.1:{port}/0")
    message = await refused(f"redis://:wrong-{PASSWORD}@127.0.0.1:{port}/0", caplog, PASSWORD)
    assert message.startswith("AuthenticationError during load on redis://:***@127.0.0.1")
    await refused(f"redis://127.0.0.1:{port}/0", caplog, PASSWORD)  # no password at all


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, ca: bool,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def throwaway_ca(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key) PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name} test CA", ca_key, None, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", key, ca, ca_key, ca=False)
    paths = folder / f"{name}-ca.pem", folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_with_a_ca_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca, cert, key = throwaway_ca(tmp_path, "good")
    other_ca, _, _ = throwaway_ca(tmp_path, "other")
    for node in server(
        tmp_path, "--tls-port", "TLSPORT", "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        "--requirepass", PASSWORD,
    ):  # fmt: skip
        url = f"rediss://:{PASSWORD}@127.0.0.1:{node.port}/0"
        await round_trip_once_up(url, RedisOptions(ca_file=str(ca)))
        await refused_by_tls(url, other_ca)


async def round_trip_once_up(url: str, options: RedisOptions) -> None:
    """``round_trip``, retried while the TLS-only servers (no plain port to PING) start."""
    for attempt in range(200):
        try:
            await round_trip(url, options)
            return
        except StoreError:
            if attempt == 199:
                raise
            await asyncio.sleep(0.05)


async def refused_by_tls(url: str, other_ca: Path) -> None:
    """A server certificate from a CA we were not told to trust: refused."""
    store = RedisStore.from_url(url, options=RedisOptions(ca_file=str(other_ca)))
    try:
        with pytest.raises(StoreError):
            await store.load("k1")
    finally:
        await store.close()


@pytest.mark.topology
async def test_sentinel_over_tls_with_a_ca_file(tmp_path: Path) -> None:
    """``rediss+sentinel://``: the sentinel and the data node listen on TLS ports only, so a
    round trip proves both legs speak TLS, checked against ``redis_ca_file``."""
    ca, cert, key = throwaway_ca(tmp_path, "good")
    other_ca, _, _ = throwaway_ca(tmp_path, "other")
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]  # fmt: skip
    for primary in server(tmp_path, "--tls-port", "TLSPORT", *tls, "--requirepass", PASSWORD):
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        lines = [
            "bind 127.0.0.1", "port 0", f"tls-port {port}", "tls-replication yes",
            *(f"{tls[i].removeprefix('--')} {tls[i + 1]}" for i in range(0, len(tls), 2)),
            f"dir {tmp_path}",
            f"sentinel monitor gwprimary 127.0.0.1 {primary.port} 1",
            f"sentinel auth-pass gwprimary {PASSWORD}",
        ]  # fmt: skip
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        sentinel = Node(port, [str(conf), "--loglevel", "warning"], binary)
        sentinel.proc = subprocess.Popen([binary, *sentinel.args], stdout=subprocess.DEVNULL)
        try:
            url = f"rediss+sentinel://:{PASSWORD}@127.0.0.1:{port}/gwprimary"
            await round_trip_once_up(url, RedisOptions(ca_file=str(ca)))
            await refused_by_tls(url, other_ca)
            # The plain scheme cannot even ask the TLS-only sentinel for the primary.
            with pytest.raises(StoreError):
                await round_trip(url.replace("rediss+", "redis+", 1))
        finally:
            sentinel.kill()


@pytest.mark.topology
async def test_sentinel_with_its_own_password_and_another_for_the_data_nodes(
    tmp_path: Path,
) -> None:
    topo = start_sentinel_set(tmp_path, password=PASSWORD, sentinel_password="sentinel-pw-42")
    try:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in topo.sentinels)
        base = f"redis+sentinel://:{PASSWORD}@{hosts}/gwprimary"
        await round_trip(base + "?sentinel_password=sentinel-pw-42")
        # Without the sentinels' password nobody can even say which node is the primary.
        with pytest.raises(StoreError):
            await round_trip(base)
    finally:
        topo.close()


@pytest.mark.topology
async def test_cluster_with_a_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    topo = await asyncio.to_thread(start_cluster, tmp_path, PASSWORD)
    try:
        await round_trip(topo.url)
        wrong = topo.url.replace(PASSWORD, "wrong-" + PASSWORD)
        await refused(wrong, caplog, PASSWORD)
    finally:
        topo.close()
