"""Contract tests: the neuronx and neuron backends against stand-in SDK modules that record calls.

The stand-ins implement the documented signatures (shared/reference/neuron.md §5) and compile
with torch.jit.trace, so the whole tracer (verification, manifest) runs through each backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from neuronserve.artifacts import load_manifest
from neuronserve.backends import BackendKind
from neuronserve.backends.base import CoreSet
from neuronserve.positional import PositionalModel
from neuronserve.trace import run_trace
from tests.conftest import make_settings

pytestmark = pytest.mark.contract


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []


def _stand_in_neuronx(recorder: Recorder) -> types.ModuleType:
    module = types.ModuleType("torch_neuronx")

    def trace(
        func: Any,
        example_inputs: Any,
        *_: Any,
        input_output_aliases: Any = None,
        compiler_workdir: Any = None,
        compiler_args: Any = None,
        partitioner_config: Any = None,
        inline_weights_to_neff: bool = True,
        cpu_backend: bool = False,
    ) -> torch.jit.ScriptModule:
        recorder.calls.append(
            {
                "func": func,
                "inputs": [(tuple(t.shape), t.dtype) for t in example_inputs],
                "compiler_args": compiler_args,
                "compiler_workdir": compiler_workdir,
            }
        )
        return cast(torch.jit.ScriptModule, torch.jit.trace(func, example_inputs, check_trace=False))

    module.trace = trace  # type: ignore[attr-defined]
    return module


def _stand_in_neuron(recorder: Recorder) -> types.ModuleType:
    module = types.ModuleType("torch_neuron")

    def trace(
        func: Any,
        example_inputs: Any,
        *,
        compiler_args: Any = None,
        compiler_timeout: Any = None,
        compiler_workdir: Any = None,
        dynamic_batch_size: bool = False,
        **kwargs: Any,
    ) -> torch.jit.ScriptModule:
        recorder.calls.append(
            {
                "func": func,
                "inputs": [(tuple(t.shape), t.dtype) for t in example_inputs],
                "compiler_args": compiler_args,
                "compiler_workdir": compiler_workdir,
                "dynamic_batch_size": dynamic_batch_size,
                "extra": kwargs,
            }
        )
        return cast(torch.jit.ScriptModule, torch.jit.trace(func, example_inputs, check_trace=False))

    module.trace = trace  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("task", ["feature-extraction", "question-answering"])
def test_neuronx_trace_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path], task: str
) -> None:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "torch_neuronx", _stand_in_neuronx(recorder))
    model_dir = tiny_model(tmp_path / "m", task)
    args = "--model-type transformer --auto-cast none --optlevel 2"
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        model__task=task,
        trace__backend="neuronx",
        trace__batch_sizes="1,2",
        trace__sequence_lengths="16",
        trace__neuronx_compiler_args=args,
    )
    report = run_trace(settings, progress=False, emit=lambda _l: None)

    assert [c["inputs"][0][0] for c in recorder.calls] == [(1, 16), (2, 16)]
    for call in recorder.calls:
        assert isinstance(call["func"], PositionalModel)
        assert not call["func"].training
        # input order is the manifest's: input_ids, attention_mask, token_type_ids
        assert call["inputs"] == [(call["inputs"][0][0], torch.int64)] * 3
        assert call["compiler_args"] == shlex.split(args)
        # compiled in the staging directory, whose work directories never reach the served one
        assert Path(call["compiler_workdir"]).parent == report.directory.with_name(".neuronx.staging")
    assert not list(report.directory.glob(".compiler-*"))
    assert not report.directory.with_name(".neuronx.staging").exists()
    manifest = load_manifest(report.directory, backend=BackendKind.NEURONX)
    assert manifest.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert manifest.compiler_args == args
    assert report.directory.name == "neuronx"
    assert [(s.batch_size, s.file) for s in manifest.shapes] == [
        (1, "model-b1-s16.pt"),
        (2, "model-b2-s16.pt"),
    ]
    assert all(s.verification["min_cosine"] > 0.9999 for s in manifest.shapes)
    # What was saved loads back through the backend once the process owns its cores.
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0")
    from neuronserve.backends.neuronx import NeuronxBackend

    loaded = NeuronxBackend().load(report.directory / "model-b1-s16.pt", CoreSet.parse("0"), 0)
    out = loaded.run(tuple(torch.ones(1, 16, dtype=torch.int64) for _ in range(3)))
    assert out[0].shape[:2] == (1, 16)


def test_neuron_trace_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path]
) -> None:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "torch_neuron", _stand_in_neuron(recorder))
    model_dir = tiny_model(tmp_path / "m", "text-classification", token_types=False)
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        model__task="text-classification",
        trace__backend="neuron",
        trace__batch_sizes="4",
        trace__sequence_lengths="32",
        trace__neuron_compiler_args="--neuroncore-pipeline-cores 4",
        trace__neuron_dynamic_batch="true",
    )
    report = run_trace(settings, progress=False, emit=lambda _l: None)
    (call,) = recorder.calls
    assert call["inputs"] == [((4, 32), torch.int64), ((4, 32), torch.int64)]  # no token_type_ids
    assert call["compiler_args"] == ["--neuroncore-pipeline-cores", "4"]
    assert call["dynamic_batch_size"] is True
    assert call["extra"] == {}
    manifest = load_manifest(report.directory, backend=BackendKind.NEURON)
    assert manifest.input_names == ("input_ids", "attention_mask")
    assert manifest.compiler_args == "--neuroncore-pipeline-cores 4 dynamic_batch_size=True"
    assert manifest.shapes[0].output_shapes == {"logits": [4, 3]}


def test_compiler_args_are_part_of_the_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path]
) -> None:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "torch_neuronx", _stand_in_neuronx(recorder))
    model_dir = tiny_model(tmp_path / "m", "feature-extraction")
    common = {
        "model__source": str(model_dir),
        "trace__backend": "neuronx",
        "trace__batch_sizes": "1",
        "trace__sequence_lengths": "16",
    }
    run_trace(make_settings(tmp_path, **common), progress=False, emit=lambda _l: None)
    run_trace(make_settings(tmp_path, **common), progress=False, emit=lambda _l: None)
    assert len(recorder.calls) == 1  # second run skipped
    changed = make_settings(tmp_path, **common, trace__neuronx_compiler_args="--auto-cast none")
    report = run_trace(changed, progress=False, emit=lambda _l: None)
    assert len(recorder.calls) == 2
    assert report.compiled == ((1, 16),)


class Placement:
    """Records the SDK's placement calls and the loads made inside them, and any overlap."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.active = 0
        self.overlapped = False
        self.lock = threading.Lock()

    def context(self) -> Callable[..., Any]:
        @contextlib.contextmanager
        def neuron_cores_context(start_nc: int = -1, nc_count: int = -1) -> Iterator[None]:
            with self.lock:
                self.active += 1
                self.overlapped |= self.active > 1  # the documented context is not thread-safe
                self.events.append(("enter", threading.current_thread().name, start_nc, nc_count))
            try:
                yield
            finally:
                with self.lock:
                    self.events.append(("exit", threading.current_thread().name, start_nc))
                    self.active -= 1

        return neuron_cores_context

    def record_loads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = torch.jit.load

        def load(path: Any, *args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.events.append(("load", threading.current_thread().name, Path(path).name))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(torch.jit, "load", load)


def _serve_engine(settings: Any) -> Any:
    """Start a server's models in a fresh event loop (the process pinned as a server pins it),
    poll until every copy loaded (or one failed)."""
    from neuronserve.serving.metrics import ServerMetrics
    from neuronserve.serving.registry import ModelRegistry

    async def run() -> Any:
        engine = ModelRegistry(settings, ServerMetrics("test"))
        engine.start()
        deadline = time.monotonic() + 60
        while engine.state == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # poll interval for readiness
        engine.close()
        return engine

    return asyncio.run(run())


def _neuronx_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> Path:
    monkeypatch.setitem(sys.modules, "torch_neuronx", _stand_in_neuronx(Recorder()))
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        trace__backend="neuronx",
        trace__batch_sizes="1,2",
        trace__sequence_lengths="16",
    )
    return run_trace(settings, progress=False, emit=lambda _l: None).directory


@pytest.mark.parametrize("where", ["top-level", "experimental"])
def test_neuronx_copies_are_placed_one_per_core_under_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path], where: str
) -> None:
    artifacts = _neuronx_artifacts(tmp_path, monkeypatch, tiny_model(tmp_path / "m", "feature-extraction"))
    placement = Placement()
    sdk = sys.modules["torch_neuronx"]
    if where == "top-level":  # Neuron 2.25 and later
        sdk.neuron_cores_context = placement.context()  # type: ignore[attr-defined]
    else:  # before 2.25 the same API lived in torch_neuronx.experimental
        sdk.experimental = types.SimpleNamespace(neuron_cores_context=placement.context())  # type: ignore[attr-defined]
    placement.record_loads(monkeypatch)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "")  # restored after; the engine sets it
    monkeypatch.setenv("NEURON_PROCESS_TAG", "")
    settings = make_settings(
        tmp_path, serve__artifacts=str(artifacts), serve__cores="4-5", serve__models_per_server="4"
    )
    engine = _serve_engine(settings)
    assert engine.state == "ready", engine.load_error
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "4-5"

    assert not placement.overlapped
    # Each copy: enter(its core relative to the visible ones, one core), load each artifact, exit.
    by_copy: dict[str, list[tuple[Any, ...]]] = {}
    for event in placement.events:
        by_copy.setdefault(event[1], []).append((event[0], *event[2:]))
    assert sorted(by_copy) == ["copy-0", "copy-1", "copy-2", "copy-3"]
    for name, events in by_copy.items():
        core = int(name.split("-")[1]) % 2
        expected: list[tuple[Any, ...]] = []
        for file in ("model-b1-s16.pt", "model-b2-s16.pt"):
            expected += [("enter", core, 1), ("load", file), ("exit", core)]
        assert events == expected, name
    # and the events of one placement are never interleaved with another's
    for i, event in enumerate(placement.events):
        if event[0] == "enter":
            assert placement.events[i + 1][:2] == ("load", event[1])
            assert placement.events[i + 2][:2] == ("exit", event[1])


def test_without_placement_api_loads_go_where_the_runtime_puts_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from neuronserve.backends.base import BackendError
    from neuronserve.backends.neuronx import NeuronxBackend

    artifacts = _neuronx_artifacts(tmp_path, monkeypatch, tiny_model(tmp_path / "m", "feature-extraction"))
    backend = NeuronxBackend()
    ones = tuple(torch.ones(1, 16, dtype=torch.int64) for _ in range(3))
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-1")
    with caplog.at_level("WARNING", logger="neuronserve.backends.sdk"):
        model = backend.load(artifacts / "model-b1-s16.pt", CoreSet.parse("0-1"), 1)
    assert "no neuron_cores_context" in caplog.text and "deploy.cores_per_server=1" in caplog.text
    assert model.run(ones)[0].shape[0] == 1
    # one visible core needs no placement (and no warning): every load lands on it
    caplog.clear()
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "3")
    with caplog.at_level("WARNING", logger="neuronserve.backends.sdk"):
        model = backend.load(artifacts / "model-b1-s16.pt", CoreSet.parse("3"), 0)
    assert caplog.text == ""
    assert model.run(ones)[0].shape[0] == 1
    # a load the runtime refuses is one clear error naming the artifact and the core
    monkeypatch.setattr(torch.jit, "load", lambda *_a, **_k: (_ for _ in ()).throw(RuntimeError("nrt_load")))
    with pytest.raises(BackendError, match=r"loading model-b1-s16\.pt on NeuronCore 0 of 3 failed: nrt_load"):
        backend.load(artifacts / "model-b1-s16.pt", CoreSet.parse("3"), 0)


def test_neuron_inf1_loads_inside_the_experimental_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path]
) -> None:
    from neuronserve.backends.neuron import NeuronBackend

    sdk = _stand_in_neuron(Recorder())
    placement = Placement()
    sdk.experimental = types.SimpleNamespace(neuron_cores_context=placement.context())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_neuron", sdk)
    settings = make_settings(
        tmp_path,
        model__source=str(tiny_model(tmp_path / "m", "text-classification", token_types=False)),
        model__task="text-classification",
        trace__backend="neuron",
        trace__batch_sizes="1",
        trace__sequence_lengths="16",
    )
    artifacts = run_trace(settings, progress=False, emit=lambda _l: None).directory
    placement.record_loads(monkeypatch)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "8-11")
    NeuronBackend().load(artifacts / "model-b1-s16.pt", CoreSet.parse("8-11"), 3)
    thread = threading.current_thread().name
    assert placement.events == [
        ("enter", thread, 3, 1),
        ("load", thread, "model-b1-s16.pt"),
        ("exit", thread, 3),
    ]


def test_neuronx_shared_weights_load_once_replicated_on_every_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path]
) -> None:
    artifacts = _neuronx_artifacts(tmp_path, monkeypatch, tiny_model(tmp_path / "m", "feature-extraction"))
    placement = Placement()
    sys.modules["torch_neuronx"].neuron_cores_context = placement.context()  # type: ignore[attr-defined]
    placement.record_loads(monkeypatch)
    for name in ("NEURON_RT_VISIBLE_CORES", "NEURON_PROCESS_TAG", "NEURON_RT_MULTI_INSTANCE_SHARED_WEIGHTS"):
        monkeypatch.setenv(name, "")  # restored after; the engine sets them
    settings = make_settings(
        tmp_path,
        serve__artifacts=str(artifacts),
        serve__cores="4-5",
        serve__models_per_server="2",
        serve__neuron_shared_weights="true",
    )
    engine = _serve_engine(settings)
    assert engine.state == "ready", engine.load_error
    assert os.environ["NEURON_RT_MULTI_INSTANCE_SHARED_WEIGHTS"] == "TRUE"  # set before the SDK loads
    # one load per artifact for the whole server, replicated on both of its cores
    assert [(e[0], *e[2:]) for e in placement.events] == [
        ("enter", 0, 2),
        ("load", "model-b1-s16.pt"),
        ("exit", 0),
        ("enter", 0, 2),
        ("load", "model-b2-s16.pt"),
        ("exit", 0),
    ]
    assert not placement.overlapped


def test_shared_weights_memory_plan_counts_the_weights_once_per_device(tmp_path: Path) -> None:
    from neuronserve.artifacts import read_manifest
    from neuronserve.deploy.inventory import parse_neuron_ls
    from neuronserve.deploy.memory import estimate
    from neuronserve.deploy.plan import make_plan

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    manifest = read_manifest(fixtures / "manifests" / "bert-large-neuronx")
    inventory = parse_neuron_ls((fixtures / "neuron-ls" / "inf2.48xlarge.json").read_text())

    def per_core(shared: bool) -> dict[int, int]:
        settings = make_settings(tmp_path, deploy__cores_per_server="2", serve__models_per_server="2")
        plan = make_plan(settings, inventory, BackendKind.NEURONX)
        return estimate(plan, [manifest], inventory, shared_weights=shared).servers[0].device

    separate, shared = per_core(False), per_core(True)
    assert separate[0] == separate[1]  # one copy on each core, each with every shape's weights
    assert shared[0] == separate[0]  # the first replica on a device holds the weights
    saved = separate[1] - shared[1]
    assert saved == sum(
        min(s, manifest.memory.weight_bytes // 2) for s in manifest.memory.artifact_bytes.values()
    )
