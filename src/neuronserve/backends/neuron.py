"""neuron backend (Inf1): ``torch_neuron.trace`` (the same function as ``torch.neuron.trace``).

torch-neuron is archived by AWS but Inf1 instances are still sold and cheap; this backend
follows the documented API (compiler_args, dynamic_batch_size) and is covered by contract tests.
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
    "torch-neuron is not installed: on an Inf1 host (or a Neuron DLC image) run "
    "`pip install torch-neuron 'neuron-cc[tensorflow]' --extra-index-url=https://pip.repos.neuron.amazonaws.com`, "
    "or set trace.backend=cpu"
)


class NeuronBackend:
    """Compiles with neuron-cc for NeuronCore-v1."""

    name = "neuron"

    def __init__(
        self, compiler_args: str = "", dynamic_batch: bool = False, *, shared_weights: bool = False
    ) -> None:
        self.compiler_args = shlex.split(compiler_args)
        # Separately compiled NEFFs each hold their own weights (no Neuron document promises
        # otherwise), so shapes share nothing; copies share one load only with shared_weights.
        self.sharing = Sharing(shapes=False, copies=shared_weights)
        self._loads = NeuronLoads(shared_weights)
        self.dynamic_batch = dynamic_batch

    def _sdk(self) -> ModuleType:
        return import_sdk("torch_neuron", "trace", INSTALL_HINT)

    def versions(self) -> dict[str, str]:
        self._sdk()
        return package_versions("torch-neuron", "neuron-cc")

    def compile(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dest: Path
    ) -> LoadedModel:
        import torch

        sdk = self._sdk()
        traced = sdk.trace(
            module.eval(),
            example_inputs=example_inputs,
            compiler_args=list(self.compiler_args),
            compiler_workdir=str(dest.parent / f".compiler-{dest.stem}"),
            dynamic_batch_size=self.dynamic_batch,
        )
        with torchscript_quietly():
            torch.jit.save(traced, str(dest))
        # The traced model is already loaded on a NeuronCore; verification runs it there.
        return TorchScriptModel(traced)

    def load(self, artifact: Path, cores: CoreSet, start_nc: int) -> LoadedModel:
        # Importing the SDK registers the neuron ops TorchScript needs to deserialize the model.
        return self._loads.load(self._sdk(), artifact, cores, start_nc)
