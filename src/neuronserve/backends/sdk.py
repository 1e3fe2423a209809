"""Helpers shared by the Neuron backends: lazy SDK import, versions, process environment."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from neuronserve.backends.base import (
    BackendError,
    CoreSet,
    LoadedModel,
    TorchScriptModel,
    torchscript_quietly,
)

log = logging.getLogger(__name__)


def import_sdk(module_name: str, required_attr: str, install_hint: str) -> ModuleType:
    """Import a Neuron SDK module or raise BackendError with one line saying how to get it.

    The PyPI packages named torch-neuronx and torch-neuron are empty placeholders, so a module
    that imports but lacks ``required_attr`` is treated as missing too.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BackendError(install_hint) from None
    if not hasattr(module, required_attr):
        raise BackendError(
            f"{install_hint} (the installed {module_name} has no {required_attr}(): "
            "the PyPI package of that name is an empty placeholder)"
        )
    return module


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (missing ones are left out)."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def neuron_environment(cores: CoreSet, tag: str, *, shared_weights: bool = False) -> dict[str, str]:
    """The variables a Neuron server process needs before it imports the SDK."""
    env = {"NEURON_RT_VISIBLE_CORES": str(cores), "NEURON_PROCESS_TAG": tag}
    if shared_weights:
        env["NEURON_RT_MULTI_INSTANCE_SHARED_WEIGHTS"] = "TRUE"
    return env


def check_visible_cores(cores: CoreSet) -> None:
    """Refuse to load when the runtime would not be pinned to ``cores``."""
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if visible is None or CoreSet.parse(visible) != cores:
        raise BackendError(
            f"this is a bug: NEURON_RT_VISIBLE_CORES is {visible!r} but this process owns cores "
            f"{cores}; it must be set before the SDK is imported (neuronserve serve does this)"
        )


def cores_context(sdk: ModuleType) -> Callable[..., contextlib.AbstractContextManager[Any]] | None:
    """The SDK's ``neuron_cores_context(start_nc, nc_count)``, wherever this release keeps it.

    torch-neuronx has it at the top level from Neuron 2.25 and under ``experimental`` before;
    torch-neuron (Inf1) only ever had the ``experimental`` one. None when the SDK has neither.
    """
    found = getattr(sdk, "neuron_cores_context", None)
    if found is None:
        found = getattr(getattr(sdk, "experimental", None), "neuron_cores_context", None)
    return found


def load_on_core(
    sdk: ModuleType,
    artifact: Path,
    cores: CoreSet,
    start_nc: int,
    *,
    lock: contextlib.AbstractContextManager[Any],
    nc_count: int = 1,
) -> LoadedModel:
    """``torch.jit.load`` an artifact inside ``neuron_cores_context(start_nc, nc_count)``.

    ``start_nc`` counts from 0 within the process's visible cores, as the SDK does; an
    ``nc_count`` above 1 replicates the model on that many cores (calls go round robin). The
    context is not thread-safe, so loads hold ``lock`` (one per backend, shared by a server's
    copies). Without the context a process that owns one core needs no placement (every load
    lands on it); with several cores the runtime's round robin would decide, so that is refused.
    """
    import torch

    check_visible_cores(cores)
    if not (start_nc >= 0 and start_nc + nc_count <= len(cores)):
        raise BackendError(
            f"this is a bug: cores {start_nc}..{start_nc + nc_count - 1} outside the {len(cores)} cores {cores}"
        )
    context = cores_context(sdk)
    if context is None and len(cores) > 1:
        # Without the context each load goes to the least used core in order (the documented
        # default), which spreads copies but does not pin a copy's shapes to one core.
        log.warning(
            "%s has no neuron_cores_context: the runtime places each load on the least used of cores "
            "%s; upgrade the SDK for explicit placement, or set deploy.cores_per_server=1",
            sdk.__name__,
            cores,
        )
    placement = contextlib.nullcontext() if context is None else context(start_nc=start_nc, nc_count=nc_count)
    try:
        with lock, placement, torchscript_quietly():
            module = torch.jit.load(str(artifact))
    except RuntimeError as exc:
        raise BackendError(
            f"loading {artifact.name} on NeuronCore {start_nc} of {cores} failed: {exc}"
        ) from exc
    return TorchScriptModel(module)


class NeuronLoads:
    """How a Neuron backend loads the copies of a server.

    Default: every copy loads its own on its own core. ``shared_weights``: one load per artifact,
    replicated on all the server's cores and shared by every copy (the SDK's multicore pattern:
    threads call one model loaded on several cores), with NEURON_RT_MULTI_INSTANCE_SHARED_WEIGHTS
    set by ``prepare_process`` so the replicas share their weights.
    """

    def __init__(self, shared_weights: bool) -> None:
        self.shared_weights = shared_weights
        self._lock = threading.Lock()  # neuron_cores_context is not thread-safe
        self._loaded: dict[Path, LoadedModel] = {}

    def load(self, sdk: ModuleType, artifact: Path, cores: CoreSet, start_nc: int) -> LoadedModel:
        if not self.shared_weights:
            return load_on_core(sdk, artifact, cores, start_nc, lock=self._lock)
        key = artifact.resolve()
        with self._lock:  # held for the whole load, so load_on_core gets no lock of its own
            if key not in self._loaded:
                self._loaded[key] = load_on_core(
                    sdk, artifact, cores, 0, lock=contextlib.nullcontext(), nc_count=len(cores)
                )
            return self._loaded[key]
