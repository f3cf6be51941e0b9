"""The container image: build the unchanged Dockerfile, run it, sign in through it, stop it.

Needs root and a running ``dockerd`` (``scripts/test-all`` installs Debian's ``docker.io`` and
starts one); it skips, saying why, where Docker cannot run, unless ``REQUIRE_CONTAINER_TEST=1``
(set by ``scripts/test-all`` once dockerd runs) makes that a failure. Docker Hub may be out of
reach: then ``scripts/make-test-base`` makes ``debian:bookworm-slim`` locally with debootstrap
(once per machine; the imported image is reused).

The container shares the host's network namespace (``--network host``), so it reaches the
test's Redis and development provider on loopback and nothing listens beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway import __version__
from gateway.crypto import new_secret
from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.echo import start_echo
from tests.conftest import CLIENT_ID, CLIENT_SECRET, SERVICE_LINKS, RedisServer, gateway_config
from tests.idp_client import http_login
from tests.support.ports import free_port

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "gateway:container-test"
BASE = "debian:bookworm-slim"
NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
BUILD_TIMEOUT = 900
UID = "10001"


def _docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no frontend image to pull
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check, env=env
    )


def _unavailable() -> str | None:
    """Why Docker cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI (Debian: apt-get install docker.io)"
    try:
        info = _docker("info", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "dockerd does not answer `docker info`"
    if info.returncode != 0:
        if os.geteuid() != 0:
            return "not root, and no dockerd this user may use"
        return "dockerd is not running (scripts/start-dockerd starts it, as root)"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built from the repository's Dockerfile, unchanged."""
    why = _unavailable()
    if why is not None:
        if os.environ.get("REQUIRE_CONTAINER_TEST") == "1":
            pytest.fail(f"the container test must run here, but: {why}")
        pytest.skip(why)
    if _docker("image", "inspect", BASE, check=False).returncode != 0:
        made = subprocess.run(
            [str(ROOT / "scripts" / "make-test-base"), BASE],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
    # --network host: the build's RUN steps (apt, pip) use the host's network as it is.
    built = _docker(
        "build", "--network", "host", "--label", "gateway.test=1", "-t", IMAGE, str(ROOT),
        timeout=BUILD_TIMEOUT, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    yield IMAGE


async def _run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def container(
    image: str, config: dict[str, object], env: dict[str, str], workdir: Path
) -> AsyncIterator[str]:
    """``docker run`` the image hardened as the docs say; yield its name; always remove it."""
    confdir = workdir / "etc-gateway"
    confdir.mkdir()
    (confdir / "gateway.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    # The image runs as uid 10001: the mounted file must be readable by it.
    confdir.chmod(0o755)
    (confdir / "gateway.yaml").chmod(0o644)
    name = f"gateway-test-{uuid.uuid4().hex[:10]}"
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    code, out = await _run(
        "run", "-d", "--name", name, "--network", "host", "--read-only",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "-v", f"{confdir}:/etc/gateway:ro", *env_args, image,
    )  # fmt: skip
    assert code == 0, out
    try:
        yield name
    finally:
        await _run("rm", "-f", name)


async def _wait_healthy(name: str, url: str) -> None:
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for _ in range(600):
            _, state = await _run("inspect", "-f", "{{.State.Running}}", name)
            if state.strip() != "true":
                _, logs = await _run("logs", name)
                raise AssertionError(f"the container stopped:\n{logs[-4000:]}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    _, logs = await _run("logs", name)
    raise AssertionError(f"no /healthz answer from the container:\n{logs[-4000:]}")


async def test_image_runs_non_root_read_only_and_signs_a_user_in(
    image: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = ClientRegistration(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uris=(url + "/oauth2/callback",)
    )
    async with await start_devidp(DevIdpConfig(users=demo_users(), clients=[client])) as idp:
        echo = await start_echo()
        try:
            cfg = gateway_config(url, idp.url, str(echo.url), redis_server.url)
            cfg["server"]["port"] = port
            # The secrets come from the environment, as in Kubernetes; the service links
            # Kubernetes adds for a Service named "gateway" must not matter.
            secret = new_secret()
            del cfg["provider"]["client_secret"]
            cfg["session"]["cookie_secrets"] = ["${COOKIE_SECRET}"]
            env = {
                **SERVICE_LINKS,
                "GATEWAY_PROVIDER__CLIENT_SECRET": CLIENT_SECRET,
                "COOKIE_SECRET": secret,
            }
            async with container(image, cfg, env, tmp_path) as name:
                await _wait_healthy(name, url)
                assert await _run("exec", name, "id", "-u") == (0, f"{UID}\n")
                assert await _run("exec", name, "gateway", "version") == (
                    0,
                    f"gateway {__version__}\n",
                )
                code, out = await _run("exec", name, "gateway", "healthcheck")
                assert (code, out) == (0, f"ok: {url}/healthz: HTTP 200\n")
                code, out = await _run("inspect", name)
                assert code == 0
                spec = json.loads(out)[0]
                assert spec["HostConfig"]["ReadonlyRootfs"] is True
                assert spec["Config"]["Healthcheck"]["Test"] == ["CMD", "gateway", "healthcheck"]
                assert "4180/tcp" in spec["Config"]["ExposedPorts"]

                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(cookie_jar=jar, headers=NAV) as http:
                    result = await http_login(http, url + "/admin/", "alice", "alice")
                    assert result.status == 200, result.body
                    async with http.get(
                        url + "/admin/x", headers={"Accept": "application/json"}
                    ) as resp:
                        assert resp.status == 200
                        seen = (await resp.json())["headers"]
                    assert ["X-Forwarded-User", "alice"] in seen
                    assert ["X-Forwarded-Groups", "admins,staff"] in seen
                _, logs = await _run("logs", name)
                for text in (secret, CLIENT_SECRET):
                    assert text not in logs
        finally:
            await echo.close()


async def test_image_stops_on_sigterm_with_exit_0(
    image: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = gateway_config(url, "http://127.0.0.1:1", "http://127.0.0.1:1", redis_server.url)
    cfg["server"]["port"] = port
    async with container(image, cfg, {}, tmp_path) as name:
        await _wait_healthy(name, url)
        code, out = await _run("stop", "--time", "60", name)
        assert code == 0, out
        assert await _run("inspect", "-f", "{{.State.ExitCode}}", name) == (0, "0\n")
