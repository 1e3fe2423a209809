"""The README's quickstart, pasted line by line into a shell on a fresh copy of the repository
(its tracked files, as a clone has them: no venv, no traced model), at the default ports. It ends
with an embedding printed, equal to sentence-transformers' for the bundled model; cleanup.sh then
leaves nothing running."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from neuronserve.deploy.local import port_in_use
from tests.conftest import REPO

pytestmark = pytest.mark.integration

DEFAULT_PORTS = (8080, 8081, 8082, 9110)  # deploy.port, base_port + server, monitor.port
TEXT = "hello world"


def quickstart_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- quickstart:start")[1].split("<!-- quickstart:end -->")[0]
    code = block.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in code.splitlines() if line.strip()]


def fresh_copy(destination: Path) -> Path:
    """The files a clone of the working tree would hold (tracked, and new files not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO / name.decode()
        if source.is_file():  # a tracked file deleted in the working tree is not in the copy
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _clean_environment() -> dict[str, str]:
    """A login shell's environment: no venv of ours on PATH, no neuronserve overrides."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if ".venv" not in p)
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("NEURONSERVE_", "VIRTUAL_ENV", "PYTHON"))
    }
    return {**keep, "PATH": path}


def test_the_readme_quickstart_ends_with_an_embedding(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    busy = [port for port in DEFAULT_PORTS if port_in_use("127.0.0.1", port)]
    assert not busy, f"the quickstart uses the default ports; in use here: {busy}"
    clone = fresh_copy(tmp_path / "neuronserve")
    env = _clean_environment()
    lines = quickstart_lines()
    assert lines[0].startswith("./trace-model/") and any("openai" in line for line in lines)
    outputs = []
    try:
        for line in lines:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", line],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
                check=False,
            )
            assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
    finally:
        cleaned = subprocess.run(
            ["./fast-api/cleanup.sh"], cwd=clone, env=env, capture_output=True, text=True, check=False
        )
    assert '"embedding":[' in outputs[lines.index(next(line for line in lines if line.startswith("curl")))]
    printed = ast.literal_eval(outputs[-1].strip().splitlines()[-1])
    assert len(printed) == 4 and all(isinstance(x, float) for x in printed), outputs[-1]
    bundled = Path(
        subprocess.run(
            [str(clone / ".venv/bin/python"), "-c", "from neuronserve.models import resolve_source; "
             "print(resolve_source('bundled:all-MiniLM-L6-v2'))"],
            capture_output=True, text=True, check=True, env=env,
        ).stdout.strip()
    )  # fmt: skip
    expected = SentenceTransformer(str(bundled), device="cpu").encode([TEXT], normalize_embeddings=True)[0]
    assert np.allclose(printed, expected[:4], atol=1e-4), (printed, expected[:4])
    assert cleaned.returncode == 0 and "stopped deployment 'neuronserve'" in cleaned.stdout, cleaned.stdout
    assert not any(port_in_use("127.0.0.1", port) for port in DEFAULT_PORTS)
    assert not (clone / "run" / "neuronserve").exists()
