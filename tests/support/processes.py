"""Gateways as real processes: a pair on one store, and the ``gateway`` command."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.crypto import new_secret
from gateway.devidp import DevIdpConfig, RunningIdp, demo_users, start_devidp
from gateway.echo import start_echo
from tests.conftest import gateway_config, registration
from tests.gateway_proc import (
    GatewayProcess,
    command_env,
    gateway_command,
    start_gateway_process,
)
from tests.support.ports import free_port


@dataclass
class Cluster:
    public_url: str
    replicas: list[GatewayProcess]
    idp: RunningIdp
    config: Path  # the first replica's config, for ``gateway sessions``


async def gateway_pair(tmp_path: Path, redis_url: str, **session: Any) -> AsyncIterator[Cluster]:
    """Two ``gateway run`` processes on one store (``session`` adds session settings)."""
    ports = [free_port(), free_port()]
    public = f"http://127.0.0.1:{ports[0]}"
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[registration(public)],
            access_token_ttl=2,
            rotate_refresh_tokens=True,
        )
    )
    echo = await start_echo()
    prefix = f"race{uuid.uuid4().hex[:8]}:"
    secrets = [new_secret()]
    replicas: list[GatewayProcess] = []
    try:
        for i, port in enumerate(ports):
            cfg = gateway_config(public, str(idp.url), str(echo.url), redis_url)
            cfg["server"] = {"host": "127.0.0.1", "port": port, "public_url": public}
            cfg["session"].update(
                key_prefix=prefix, cookie_secrets=secrets, refresh_skew=1, **session
            )
            replicas.append(await start_gateway_process(cfg, tmp_path, name=f"gateway-{i}"))
        yield Cluster(public, replicas, idp, replicas[0].config_path)
    finally:
        for replica in replicas:
            await replica.close()
        await echo.close()
        await idp.close()


@contextlib.asynccontextmanager
async def serving(*args: str, port: int, env: dict[str, str] | None = None) -> AsyncIterator[None]:
    """Run a long-lived ``gateway`` subcommand until its port answers; stop it by its PID."""
    proc = await asyncio.create_subprocess_exec(
        *gateway_command(), *args, env=command_env(env),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(300):
            assert proc.returncode is None, "exited early"
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def gateway_cli(*args: str) -> tuple[int, str]:
    """Run the ``gateway`` command; no GATEWAY_* variable of ours may override its config."""
    proc = await asyncio.create_subprocess_exec(
        *gateway_command(), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=command_env(),
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


ROOT = Path(__file__).resolve().parents[2]  # the repository root


async def gateway(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the gateway command; return (exit code, stdout, stderr)."""
    full_env = command_env({"PYTHONPATH": str(ROOT), **(env or {})})
    return await run_command([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=full_env)


async def run_command(argv: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``argv`` to its end (killed after 60 s); return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
