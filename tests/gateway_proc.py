"""Run the real ``gateway run --config FILE`` command as a subprocess for a test.

``start_gateway_process`` writes the config dict as YAML, starts the console script (or
``python -m gateway.cli`` when the script is not installed next to this interpreter),
waits until ``/healthz`` answers 200 and returns a handle whose ``close()`` terminates and
reaps the process. Everything the process logs goes to a file so tests can read it (and
check that no secret ever shows up there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def gateway_command() -> list[str]:
    """The installed ``gateway`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("gateway")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli"]


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any GATEWAY_* variable (none of ours may override the config
    under test), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra or {})
    return env


@dataclass
class GatewayProcess:
    url: str
    process: asyncio.subprocess.Process
    config_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def close(self) -> None:
        """SIGTERM (SIGKILL after a grace period) and reap. Idempotent."""
        proc = self.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def start_gateway_process(
    config: dict[str, Any],
    workdir: Path,
    *,
    name: str = "gateway",
    args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> GatewayProcess:
    """Start ``gateway run`` on ``config["server"]`` host/port; raise with its log if it fails."""
    server = config["server"]
    url = f"http://{server['host']}:{server['port']}"
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log_path = workdir / f"{name}.log"
    env = command_env({"PYTHONUNBUFFERED": "1", **(extra_env or {})})
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *gateway_command(), "run", "--config", str(config_path), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    running = GatewayProcess(url, proc, config_path, log_path)
    try:
        await _wait_healthy(running)
    except BaseException:
        await running.close()
        raise
    return running


async def _wait_healthy(gw: GatewayProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while loop.time() < deadline:
            if gw.process.returncode is not None:
                raise RuntimeError(
                    f"gateway run exited with {gw.process.returncode}:\n{gw.log()[-4000:]}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(gw.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"gateway run did not answer /healthz in time:\n{gw.log()[-4000:]}")
