"""Helpers shared by the Neuron backends: lazy SDK import, versions, process environment."""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from types import ModuleType

from neuronserve.backends.base import BackendError, CoreSet


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


def neuron_environment(cores: CoreSet, tag: str) -> dict[str, str]:
    """The variables a Neuron server process needs before it imports the SDK."""
    return {"NEURON_RT_VISIBLE_CORES": str(cores), "NEURON_PROCESS_TAG": tag}


def check_visible_cores(cores: CoreSet) -> None:
    """Refuse to load when the runtime would not be pinned to ``cores``."""
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if visible is None or CoreSet.parse(visible) != cores:
        raise BackendError(
            f"this is a bug: NEURON_RT_VISIBLE_CORES is {visible!r} but this process owns cores "
            f"{cores}; it must be set before the SDK is imported (neuronserve serve does this)"
        )
