"""Backend selection, core sets, process pinning and the missing-SDK message."""

from __future__ import annotations

import os
import sys
import types

import pytest

from neuronserve.backends import BackendKind, choose_backend
from neuronserve.backends.base import BackendError, CoreSet
from neuronserve.backends.sdk import check_visible_cores
from neuronserve.cli import main
from neuronserve.config import TraceSettings


@pytest.mark.parametrize(
    ("importable", "devices", "expected", "reason"),
    [
        (set(), [], "cpu", "no /dev/neuron* devices"),
        ({"torch_neuronx", "torch_neuron"}, ["/dev/neuron0"], "neuronx", "torch_neuronx is importable"),
        ({"torch_neuron"}, ["/dev/neuron0", "/dev/neuron1"], "neuron", "2 Neuron device(s)"),
        (set(), ["/dev/neuron0"], "cpu", "neither torch_neuronx nor torch_neuron is installed"),
        ({"torch_neuronx"}, [], "cpu", "no /dev/neuron* devices"),
    ],
)
def test_auto_choice_and_reason(importable: set[str], devices: list[str], expected: str, reason: str) -> None:
    name, why = choose_backend("auto", sdk_importable=lambda m: m in importable, devices=lambda: devices)
    assert name == expected
    assert reason in why


def test_explicit_backend_is_taken_as_is() -> None:
    assert choose_backend("neuron", devices=list)[0] == "neuron"


@pytest.mark.parametrize(
    ("text", "ids"), [("0", (0,)), ("0-3", (0, 1, 2, 3)), ("3,4,5", (3, 4, 5)), ("3-5,6", (3, 4, 5, 6))]
)
def test_core_sets(text: str, ids: tuple[int, ...]) -> None:
    cores = CoreSet.parse(text)
    assert cores.ids == ids
    assert CoreSet.parse(str(cores)) == cores


@pytest.mark.parametrize(
    ("text", "message"),
    [("3,5,6", "contiguous"), ("", "at least one"), ("2-1", "increasing"), ("a", "range like")],
)
def test_bad_core_sets(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoreSet.parse(text)


def _hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError


@pytest.mark.parametrize(
    ("backend", "module", "package"),
    [("neuronx", "torch_neuronx", "torch-neuronx"), ("neuron", "torch_neuron", "torch-neuron")],
)
def test_missing_sdk_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    backend: str,
    module: str,
    package: str,
) -> None:
    _hide(monkeypatch, module)
    with pytest.raises(BackendError, match=f"pip install {package}"):
        BackendKind(backend).create(TraceSettings()).versions()
    assert main(["trace", "--set", f"trace.backend={backend}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{package} is not installed" in err[0]
    assert "pip.repos.neuron.amazonaws.com" in err[0]


def test_pypi_placeholder_is_reported_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_neuronx", types.ModuleType("torch_neuronx"))
    with pytest.raises(BackendError, match="empty placeholder"):
        BackendKind.NEURONX.create(TraceSettings()).versions()


def test_neuron_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    monkeypatch.delenv("NEURON_PROCESS_TAG", raising=False)
    cores = CoreSet.parse("2-3")
    with pytest.raises(BackendError, match="must be set before the SDK is imported"):
        check_visible_cores(cores)
    BackendKind.NEURONX.prepare_process(cores, copies=2, tag="server-1")
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "2-3"
    assert os.environ["NEURON_PROCESS_TAG"] == "server-1"
    check_visible_cores(cores)
    with pytest.raises(BackendError, match="owns cores 0"):
        check_visible_cores(CoreSet.parse("0"))


def test_cpu_pinning_sets_affinity_and_threads() -> None:
    import torch

    before_affinity, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        first = min(before_affinity)
        assert BackendKind.CPU.prepare_process(CoreSet((first,)), copies=2, tag="t") == 1
        assert os.sched_getaffinity(0) == {first}
        assert torch.get_num_threads() == 1
    finally:
        os.sched_setaffinity(0, before_affinity)
        torch.set_num_threads(before_threads)


def test_cpu_pinning_refuses_unavailable_cores() -> None:
    with pytest.raises(ValueError, match="not available"):
        BackendKind.CPU.prepare_process(CoreSet((4096,)), copies=1, tag="t")
