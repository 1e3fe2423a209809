"""``neuronserve doctor``: what this host has for serving, each problem with its fix.

The first command to run on a new host. Every fact comes through :class:`Host`, so the checks
are tested on recorded ``neuron-ls -j`` outputs and stand-in package lists.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronserve.config import Settings

if TYPE_CHECKING:
    from neuronserve.backends import BackendKind

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
NEURON_REPO = "--extra-index-url=https://pip.repos.neuron.amazonaws.com"
SDK_PACKAGES = {"neuronx": ("torch-neuronx", "neuronx-cc"), "neuron": ("torch-neuron", "neuron-cc")}
RUNTIME_LIBRARY = "/opt/aws/neuron/lib/libnrt.so*"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and how to fix a failure."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _neuron_ls() -> tuple[int, str, str] | None:
    from neuronserve.deploy.inventory import neuron_ls_tool

    tool = neuron_ls_tool()
    if tool is None:
        return None
    try:
        done = subprocess.run([tool, "-j"], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return 124, "", "neuron-ls -j did not answer within 60 s"
    return done.returncode, done.stdout, done.stderr


@dataclass
class Host:
    """What the checks read from the host; tests replace any of it."""

    devices: Callable[[], list[str]] = field(default=lambda: sorted(glob.glob("/dev/neuron[0-9]*")))
    neuron_ls: Callable[[], tuple[int, str, str] | None] = _neuron_ls
    version: Callable[[str], str | None] = _version
    importable: Callable[[str], bool] = lambda name: importlib.util.find_spec(name) is not None
    which: Callable[[str], str | None] = shutil.which
    runtime_library: Callable[[], list[str]] = field(default=lambda: sorted(glob.glob(RUNTIME_LIBRARY)))
    python: Callable[[], str] = platform.python_version


def _sdk_matches_torch(sdk_version: str, torch_version: str) -> bool:
    """torch-neuronx 2.1.2.2.3.0 and torch-neuron 1.13.1.2.x are built for torch 2.1.2 / 1.13.1."""
    built_for = ".".join(sdk_version.split(".")[:3])
    return torch_version.split("+", 1)[0] == built_for


def check_host(settings: Settings, host: Host | None = None) -> list[Check]:
    """Every check, in the order a user fixes things."""
    from neuronserve.backends import choose_backend

    h = host or Host()
    checks: list[Check] = []
    python = h.python()
    major, minor = (int(p) for p in python.split(".")[:2])
    checks.append(
        Check("python", OK, python)
        if (major, minor) >= (3, 10)
        else Check("python", FAIL, python, "use Python 3.10 or later (the Neuron DLC images have 3.10)")
    )
    requested = settings.trace.backend
    devices = h.devices()
    backend, why = choose_backend(requested, sdk_importable=h.importable, devices=lambda: devices)
    neuron = backend.neuron_cores
    if devices and not neuron:  # a Neuron host without its SDK would serve on its CPUs
        checks.append(
            Check(
                "backend",
                FAIL,
                f"cpu, although {len(devices)} Neuron device(s) exist ({why})",
                f"install the Neuron SDK: pip install torch-neuronx neuronx-cc {NEURON_REPO} "
                "(Inf1: torch-neuron neuron-cc), or set trace.backend=cpu to mean it",
            )
        )
    else:
        checks.append(Check("backend", OK, f"{backend} ({why})"))
    checks += _devices(devices, neuron, h)
    checks += _packages(backend, h)
    checks += _programs(h)
    for model in settings.per_model().values():  # every served model's artifacts
        checks += _artifacts(model, backend, h)
    return checks


def _devices(devices: list[str], neuron: bool, h: Host) -> list[Check]:
    from neuronserve.deploy.inventory import InventoryError, parse_neuron_ls

    if not devices:
        if neuron:
            return [
                Check(
                    "neuron devices",
                    FAIL,
                    "no /dev/neuron*",
                    "run on an Inf1/Inf2/Trn instance with the Neuron driver (aws-neuronx-dkms) loaded",
                )
            ]
        return [
            Check("neuron devices", INFO, "none: a cpu host (the cpu backend serves everything)"),
            Check("neuron runtime", INFO, "not needed here; an Inf/Trn host needs aws-neuronx-runtime-lib"),
            Check("neuron-ls", INFO, "not needed here; an Inf/Trn host needs aws-neuronx-tools"),
            Check(
                "neuron sdk",
                INFO,
                f"not needed here; Inf2/Trn: pip install torch-neuronx neuronx-cc {NEURON_REPO}",
            ),
            Check(
                "neuron sdk (inf1)",
                INFO,
                f"not needed here; Inf1: pip install torch-neuron neuron-cc {NEURON_REPO}",
            ),
        ]
    found = [
        Check(
            "neuron devices",
            OK,
            f"{len(devices)}: {', '.join(devices[:4])}{' ...' if len(devices) > 4 else ''}",
        )
    ]
    libraries = h.runtime_library()
    found.append(
        Check("neuron runtime", OK, libraries[-1])
        if libraries
        else Check(
            "neuron runtime", FAIL, "no libnrt.so", "install aws-neuronx-runtime-lib (Neuron apt repository)"
        )
    )
    listed = h.neuron_ls()
    if listed is None:
        return [
            *found,
            Check("neuron-ls", FAIL, "not found", "install aws-neuronx-tools (Neuron apt repository)"),
        ]
    code, out, err = listed
    if code != 0:
        detail = (err.strip().splitlines() or ["no output"])[-1]
        return [
            *found,
            Check(
                "neuron-ls",
                FAIL,
                f"exit {code}: {detail}",
                "is the Neuron driver loaded (lsmod | grep neuron)?",
            ),
        ]
    try:
        inventory = parse_neuron_ls(out)
    except InventoryError as exc:
        return [*found, Check("neuron-ls", FAIL, str(exc), "update aws-neuronx-tools")]
    memory = sorted(set(inventory.core_memory.values()))
    per_core = ", ".join(f"{m / (1 << 30):.1f} GiB" for m in memory) or "unknown"
    found.append(Check("neuroncores", OK, f"{len(inventory.cores)} cores; device memory per core {per_core}"))
    found.append(_cores_in_use(out))
    return found


def _cores_in_use(neuron_ls_json: str) -> Check:
    """Which devices' cores another process holds (the runtime reserves them exclusively)."""
    held = []
    for device in json.loads(neuron_ls_json):
        processes: list[dict[str, Any]] = device.get("neuron_processes") or []
        for p in processes:
            cores = device.get("neuroncore_ids") or f"device {device.get('neuron_device')}"
            held.append(f"{cores} by pid {p.get('pid')} ({p.get('command', '?')})")
    if not held:
        return Check("cores free", OK, "no other process holds a NeuronCore")
    return Check(
        "cores free",
        WARN,
        "held: " + "; ".join(held),
        "stop those processes, or deploy on other cores (deploy.cores)",
    )


def _packages(backend: BackendKind, h: Host) -> list[Check]:
    torch = h.version("torch")
    checks = [
        Check("torch", OK, torch)
        if torch
        else Check(
            "torch",
            FAIL,
            "not installed",
            "pip install -c constraints/cpu.txt torch --index-url https://download.pytorch.org/whl/cpu (cpu), or the Neuron SDK's",
        )
    ]
    if not backend.neuron_cores:
        return checks
    sdk, compiler = SDK_PACKAGES[backend]
    install = f"pip install {sdk} {compiler} {NEURON_REPO}"
    sdk_version, compiler_version = h.version(sdk), h.version(compiler)
    module = sdk.replace("-", "_")
    if sdk_version is None or not h.importable(module):
        checks.append(Check(sdk, FAIL, "not installed", install))
    else:
        checks.append(Check(sdk, OK, sdk_version))
        if torch and not _sdk_matches_torch(sdk_version, torch):
            checks.append(
                Check(
                    "torch matches SDK",
                    FAIL,
                    f"{sdk} {sdk_version} is built for torch {'.'.join(sdk_version.split('.')[:3])}, not {torch}",
                    f"reinstall {sdk} and let it choose torch ({install})",
                )
            )
    checks.append(
        Check(compiler, OK, compiler_version)
        if compiler_version
        else Check(compiler, FAIL, "not installed", install)
    )
    return checks


def _programs(h: Host) -> list[Check]:
    nginx = h.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    return [
        Check("nginx", OK, nginx)
        if nginx
        else Check("nginx", FAIL, "not found", "apt-get install nginx-light"),
        Check("supervisord", OK, "python package supervisor")
        if h.importable("supervisor")
        else Check("supervisord", FAIL, "not installed", "pip install supervisor"),
    ]


def _artifacts(settings: Settings, backend: BackendKind, h: Host) -> list[Check]:
    """Whether the traced artifacts serve on this host: the backend, and torch's major.minor
    (what the server itself checks); other version differences only mean a re-trace would
    compile again."""
    from neuronserve.artifacts import MANIFEST_NAME, ArtifactError, artifacts_directory, read_manifest

    directory = artifacts_directory(settings, backend)
    if not (directory / MANIFEST_NAME).is_file():
        return [Check("artifacts", INFO, f"none in {directory}", "trace them: ./trace-model/run.sh")]
    try:
        manifest = read_manifest(directory)
    except ArtifactError as exc:
        return [Check("artifacts", FAIL, str(exc), "trace again: ./trace-model/run.sh --force")]
    problems = []
    if manifest.backend != backend:
        problems.append(f"traced for {manifest.backend}, this host serves {backend}")
    traced_torch, torch = manifest.versions.get("torch", ""), h.version("torch") or "none"
    if traced_torch.split(".")[:2] != torch.split(".")[:2]:
        problems.append(f"traced with torch {traced_torch}, {torch} is installed")
    if problems:
        return [Check("artifacts", FAIL, f"{directory}: " + "; ".join(problems), "trace again on this host")]
    others = [
        f"{name} {traced} (now {h.version(name) or 'none'})"
        for name, traced in manifest.versions.items()
        if name not in ("python", "torch", "neuronserve") and h.version(name) != traced
    ]
    if others:
        return [
            Check(
                "artifacts",
                WARN,
                f"{directory}: traced with " + ", ".join(others),
                "they serve as they are; a trace now would compile them again",
            )
        ]
    return [Check("artifacts", OK, f"{directory}: {len(manifest.shapes)} shapes for {backend}")]


def report(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status:<4}] {c.name:<18} {c.detail}")
        if c.fix and c.status in (FAIL, WARN):
            lines.append(f"{'':<26}fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    lines.append(f"{failed} problem(s) to fix" if failed else "ready to trace and serve")
    return "\n".join(lines)
