"""The coverage-guided harnesses (``tests/fuzz/atheris_*.py``), each run for a few seconds
over its corpus in ``tests/fuzz/corpus/<target>/``, so CI exercises them on every run.

``scripts/fuzz`` runs them for longer and keeps what they learn in the corpus.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.profiles import TRIED

pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.skipif(
        importlib.util.find_spec("atheris") is None, reason="atheris is not installed"
    ),
]

HERE = Path(__file__).parent
TARGETS = sorted(p.stem.removeprefix("atheris_") for p in HERE.glob("atheris_*.py"))
# libFuzzer's -merge re-runs the harness as a program (its shebang finds this interpreter).
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}
SECONDS = int(os.environ.get("GATEWAY_FUZZ_ATHERIS_SECONDS", "4"))


def run_target(target: str, seconds: int, work: Path, corpus: Path | None = None) -> str:
    """Run one harness; return its output. New inputs go to ``work/new`` (and, when
    ``corpus`` is given, are merged back into it, minimised)."""
    new = work / "new"
    new.mkdir(parents=True, exist_ok=True)
    seeds = HERE / "corpus" / target
    cmd = [sys.executable, str(HERE / f"atheris_{target}.py"), f"-max_total_time={seconds}",
           "-max_len=4096", "-print_final_stats=1", f"-artifact_prefix={work}/",
           str(new), str(seeds)]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 120, check=False, env=ENV
    )
    out = done.stdout + done.stderr
    if done.returncode != 0:
        lines = [line for line in out.splitlines() if "Instrumenting" not in line]
        # The Python traceback and the libFuzzer summary, without the progress lines.
        crash = "\n".join(line for line in lines if not line.startswith("#"))
        raise AssertionError(f"atheris_{target} failed ({done.returncode}):\n{crash[-6000:]}")
    if corpus is not None:
        merged = work / "merged"
        merged.mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, str(HERE / f"atheris_{target}.py"), "-merge=1", "-max_len=4096",
             str(merged), str(seeds), str(new)],
            capture_output=True, text=True, timeout=600, check=True, env=ENV,
        )  # fmt: skip
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.copytree(merged, corpus)
    return out


def runs_of(output: str) -> int:
    found = re.search(r"stat::number_of_executed_units: (\d+)", output)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("target", TARGETS)
def test_atheris_target(target: str, tmp_path: Path) -> None:
    out = run_target(target, SECONDS, tmp_path)
    runs = runs_of(out)
    TRIED[f"atheris: {target}"] += runs
    assert runs > 0, out[-2000:]
