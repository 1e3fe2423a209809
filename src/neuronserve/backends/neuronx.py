"""neuronx backend (Inf2, Trn1/Trn2): ``torch_neuronx.trace`` with neuronx-cc arguments.

The SDK is imported only inside these methods. ``NEURON_RT_VISIBLE_CORES`` and
``NEURON_PROCESS_TAG`` must be set before the first import (see ``prepare_process``), because the
runtime reads them once when it initialises.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from neuronserve.backends.base import (
    CoreSet,
    LoadedModel,
    Sharing,
    TorchScriptModel,
    torchscript_quietly,
)
from neuronserve.backends.sdk import NeuronLoads, import_sdk, package_versions

if TYPE_CHECKING:
    import torch

INSTALL_HINT = (
    "torch-neuronx is not installed: on an Inf2/Trn1 host (or a Neuron DLC image) run "
    "`pip install torch-neuronx neuronx-cc --extra-index-url=https://pip.repos.neuron.amazonaws.com`, "
    "or set trace.backend=cpu"
)


class NeuronxBackend:
    """Compiles with neuronx-cc; artifacts are TorchScript holding one fused ``neuron::Model``."""

    name = "neuronx"

    def __init__(self, compiler_args: str = "", *, shared_weights: bool = False) -> None:
        self.compiler_args = shlex.split(compiler_args)
        # Separately compiled NEFFs each hold their own weights (no Neuron document promises
        # otherwise), so shapes share nothing; copies share one load only with shared_weights.
        self.sharing = Sharing(shapes=False, copies=shared_weights)
        self._loads = NeuronLoads(shared_weights)

    def _sdk(self) -> ModuleType:
        return import_sdk("torch_neuronx", "trace", INSTALL_HINT)

    def versions(self) -> dict[str, str]:
        self._sdk()
        return package_versions("torch-neuronx", "neuronx-cc", "libneuronxla")

    def compile(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path
    ) -> LoadedModel:
        import torch

        sdk = self._sdk()
        traced = sdk.trace(
            module.eval(),
            example_inputs,
            compiler_workdir=str(dest.parent / f".compiler-{dest.stem}"),
            compiler_args=list(self.compiler_args),
        )
        with torchscript_quietly():
            torch.jit.save(traced, str(dest))
        # The traced model is already loaded on a NeuronCore; verification runs it there.
        return TorchScriptModel(traced)

    def load(self, artifact: Path, cores: CoreSet, start_nc: int) -> LoadedModel:
        # Importing the SDK registers the neuron ops TorchScript needs to deserialize the model.
        return self._loads.load(self._sdk(), artifact, cores, start_nc)
