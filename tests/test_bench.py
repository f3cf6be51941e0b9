"""The benchmark in bench/ runs (at its smallest settings) and writes every table, and
``gateway run`` serves on uvloop. No timing is ever asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import gateway_config
from tests.gateway_proc import start_gateway_process
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_bench_quick_runs_and_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    committed = (ROOT / "bench" / "RESULTS.md").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--output", str(out)],
        capture_output=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    text = out.read_text()
    for heading in (
        "## Machine", "## Versions", "## Set-up",
        "## Throughput: the gateway against the bare aiohttp proxy", "## Stored sessions",
        "## Logins", "## Memory", "## Per-request pieces",
    ):  # fmt: skip
        assert heading in text
    assert "| bare aiohttp proxy |" in text
    assert "| gateway, valid session |" in text
    assert "| round 1 | gateway |" in text
    assert "| 100 |" in text  # the quick stored-session count
    assert "| gateway RSS per idle keep-alive connection |" in text
    assert "| cookie open (ticket AEAD) |" in text
    assert "| gateway event loop | uvloop |" in text
    assert "## The gateway's CPU per request, layer by layer" in text
    assert "| + authentication (valid session) |" in text
    # Every wrk round was clean: each target answered 200 with the backend's body throughout
    # (bare, gateway, and the two layer gateways).
    rounds = [line for line in text.splitlines() if line.startswith("| round 1 |")]
    assert len(rounds) == 4 and all(line.endswith("| none |") for line in rounds)
    assert {line.split(" | ")[1] for line in rounds} == {
        "bare",
        "gateway",
        "public, no log",
        "public",
    }
    # The committed results are left alone.
    assert (ROOT / "bench" / "RESULTS.md").read_bytes() == committed


async def test_gateway_run_serves_on_uvloop(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = gateway_config(url, "http://127.0.0.1:9", "http://127.0.0.1:9", None)
    cfg["server"]["port"] = port
    gw = await start_gateway_process(cfg, tmp_path)
    try:
        fds = Path(f"/proc/{gw.process.pid}/fd")
        kinds = {os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()}
    finally:
        await gw.close()
    # libuv wakes its loop through an eventfd; asyncio's own loop uses a socket pair instead.
    assert "anon_inode:[eventfd]" in kinds
