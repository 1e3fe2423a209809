"""The memory plan: estimates from the manifest and the plan, refused before anything starts."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from neuronserve.artifacts import read_manifest
from neuronserve.backends import BackendKind
from neuronserve.deploy.inventory import host_memory_available, parse_neuron_ls
from neuronserve.deploy.memory import GIB, MemoryPlan, MemoryPlanError, estimate
from neuronserve.deploy.plan import make_plan
from tests.conftest import REPO, make_settings, run_cli, trace_tiny

FIXTURES = REPO / "tests" / "fixtures"
INF2_48 = FIXTURES / "neuron-ls" / "inf2.48xlarge.json"
BERT_LARGE = FIXTURES / "manifests" / "bert-large-neuronx"


def _plan(tmp_path: Path, **values: str) -> MemoryPlan:
    settings = make_settings(tmp_path, serve__artifacts=str(BERT_LARGE), **values)
    inventory = parse_neuron_ls(INF2_48.read_text())
    inventory = dataclasses.replace(inventory, host_memory=768 * GIB)
    plan = make_plan(settings, inventory, BackendKind.NEURONX)
    return estimate(plan, [read_manifest(BERT_LARGE)], inventory)


def test_device_memory_per_core_comes_from_neuron_ls() -> None:
    inf2 = parse_neuron_ls(INF2_48.read_text())
    assert set(inf2.core_memory.values()) == {16 * GIB}  # 32 GiB per device, 2 cores each
    inf1 = parse_neuron_ls((FIXTURES / "neuron-ls" / "inf1.6xlarge.json").read_text())
    assert set(inf1.core_memory.values()) == {2 * GIB}  # 8 GiB per device, 4 cores each


def test_bert_large_with_two_copies_per_core_is_refused(tmp_path: Path) -> None:
    memory = _plan(tmp_path, serve__models_per_server="2")
    manifest = read_manifest(BERT_LARGE)
    artifacts = sum(manifest.memory.artifact_bytes.values())
    for server in memory.servers:
        ((_core, used),) = server.device.items()
        # 2 copies x 16 separately compiled shapes, each with its own weights, on one core
        assert used > 2 * artifacts > 16 * GIB
    with pytest.raises(MemoryPlanError) as refused:
        memory.check()
    message = str(refused.value)
    assert (
        "24 NeuronCores (0-23) would need ~21.4 GiB of device memory each, a NeuronCore has 16.0 GiB"
        in message
    )
    for knob in (
        "serve.models_per_server",
        "trace.batch_sizes",
        "trace.sequence_lengths",
        "deploy.cores_per_server",
    ):
        assert knob in message


@pytest.mark.parametrize(
    "values",
    [
        {"serve__models_per_server": "1"},
        # two cores per server: one copy on each, so each core holds one copy's shapes
        {"serve__models_per_server": "2", "deploy__cores_per_server": "2"},
    ],
)
def test_plans_that_fit_pass(tmp_path: Path, values: dict[str, str]) -> None:
    memory = _plan(tmp_path, **values)
    memory.check()
    used = [b for s in memory.servers for b in s.device.values()]
    assert len(used) == 24 and 10 * GIB < max(used) < 16 * GIB


def test_cpu_copies_share_one_load_and_host_memory_is_checked(tmp_path: Path) -> None:
    from neuronserve.deploy.inventory import Inventory

    manifest = trace_tiny(tmp_path, trace__batch_sizes="1,4", trace__sequence_lengths="16,32").manifest
    artifact = sum(manifest.memory.artifact_bytes.values())

    def host(copies: int, available: int) -> MemoryPlan:
        s = make_settings(tmp_path, serve__models_per_server=str(copies), deploy__cores="0-1")
        inventory = Inventory("cpu", (0, 1), {}, host_memory=available)
        return estimate(make_plan(s, inventory, BackendKind.CPU), [manifest], inventory)

    one, two = host(1, 64 * GIB), host(2, 64 * GIB)
    per_copy = two.servers[0].host - one.servers[0].host
    assert 0 < per_copy < artifact * 10  # a copy adds its working set, not another load
    one.check()
    with pytest.raises(MemoryPlanError, match=r"need ~.* GiB of host memory but 0\.1 GiB is available"):
        host(2, GIB // 10).check()


def test_an_onnx_artifact_counts_a_session_per_thread_count(tmp_path: Path) -> None:
    """ONNX Runtime fixes a session's threads: a server of two CPUs loads an ONNX artifact twice
    (one thread, both), a server of one CPU once; TorchScript's is loaded once either way."""
    from neuronserve.deploy.inventory import Inventory

    manifest = trace_tiny(
        tmp_path, trace__batch_sizes="1,4", trace__sequence_lengths="16,32", trace__cpu_engine="torchscript"
    ).manifest
    artifact = sum(manifest.memory.artifact_bytes.values())
    onnx = dataclasses.replace(
        manifest, memory=dataclasses.replace(manifest.memory, artifact_bytes={"model-b4-s32.onnx": artifact})
    )

    def plan(m: object, cores: str) -> MemoryPlan:
        s = make_settings(tmp_path, serve__models_per_server="1", deploy__cores=cores)
        inventory = Inventory("cpu", (0, 1), {}, host_memory=64 * GIB)
        return estimate(make_plan(s, inventory, BackendKind.CPU), [m], inventory)  # type: ignore[list-item]

    assert plan(onnx, "0-1").servers[0].host - plan(manifest, "0-1").servers[0].host == artifact
    assert plan(onnx, "0").servers[0].host == plan(manifest, "0").servers[0].host
    assert "ONNX Runtime" in plan(onnx, "0-1").summary and "ONNX" not in plan(manifest, "0-1").summary


def test_host_memory_available_reads_meminfo() -> None:
    text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n"
    assert host_memory_available(text) == 20000000 * 1024
    assert host_memory_available("MemTotal: 1 kB\n") == 0
    assert host_memory_available() > 0  # this host


def _dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(  # type: ignore[no-any-return]
        *("deploy", "--dry-run", "--neuron-ls", str(INF2_48), "--host-memory-gib", "768"),
        *("--set", f"serve.artifacts={BERT_LARGE}", *args),
    )


def test_dry_run_prints_per_core_device_memory_and_refuses_what_does_not_fit() -> None:
    refused = _dry_run("--set", "serve.models_per_server=2")
    assert refused.returncode == 1
    assert "nc23: 21.38/16.00" in refused.stdout
    (line,) = refused.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("neuronserve: the plan does not fit: 24 NeuronCores (0-23)")
    assert "serve.models_per_server" in line

    fits = _dry_run("--set", "serve.models_per_server=1")
    assert fits.returncode == 0, fits.stderr
    assert "device GiB per NeuronCore" in fits.stdout and "nc0: 10.86/16.00" in fits.stdout


def test_planning_for_another_host_needs_dry_run() -> None:
    result = run_cli("deploy", "--neuron-ls", str(INF2_48))
    assert result.returncode == 2
    assert "use it with --dry-run" in result.stderr


def test_host_memory_is_capped_by_the_cgroup(tmp_path: Path) -> None:
    meminfo = "MemAvailable:   20000000 kB\n"
    (tmp_path / "memory.max").write_text(f"{4 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{1 * GIB}\n")
    assert host_memory_available(meminfo, tmp_path) == 3 * GIB
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert host_memory_available(meminfo, tmp_path) == 20000000 * 1024


def test_a_real_deploy_that_does_not_fit_starts_nothing(tmp_path: Path) -> None:
    artifacts = trace_tiny(tmp_path).directory
    (tmp_path / "config.properties").write_text(f"serve.artifacts={artifacts}\ndeploy.run_dir=run\n")
    config = str(tmp_path / "config.properties")
    result = run_cli("deploy", "--config", config, "--host-memory-gib", "0.01", cwd=tmp_path)
    assert result.returncode == 1
    assert "of host memory but 0.0 GiB is available; run fewer servers (deploy.servers" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_every_model_of_a_server_counts_and_a_pair_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    inventory = dataclasses.replace(parse_neuron_ls(INF2_48.read_text()), host_memory=768 * GIB)
    manifest = read_manifest(BERT_LARGE)
    artifacts = sum(manifest.memory.artifact_bytes.values())

    def memory(**values: str) -> MemoryPlan:
        settings = make_settings(
            tmp_path,
            serve__artifacts=str(BERT_LARGE),
            serve__models_per_server="1",
            models__second__source="/models/second",
            models__second__artifacts=str(BERT_LARGE),
            **values,
        )
        plan = make_plan(settings, inventory, BackendKind.NEURONX)
        assert [name for name, _copies in plan.model_copies][1:] == ["second"]
        return estimate(plan, [manifest, manifest], inventory)

    alone = _plan(tmp_path, serve__models_per_server="1")
    alone.check()  # one BERT-large copy per core fits (see test_plans_that_fit_pass)
    pair = memory()
    for one, both in zip(alone.servers, pair.servers, strict=True):
        ((core, used_alone),) = one.device.items()
        # the second model's artifacts join the first's on the core; the scratchpad is shared
        assert both.device[core] - used_alone == artifacts
        assert both.host - one.host == artifacts  # each Neuron load keeps its host copy
    assert "second:" in pair.summary and pair.summary.count("artifact(s)") == 2
    with pytest.raises(MemoryPlanError, match=r"would need ~21\.4 GiB") as refused:
        pair.check()
    assert "models.<name>.copies" in str(refused.value)
    # two cores per server: the second model's copy goes on the core the first one left free
    spread = memory(deploy__cores_per_server="2")
    spread.check()
    assert all(
        used == max(alone.servers[0].device.values()) for s in spread.servers for used in s.device.values()
    )


def test_a_traced_model_of_another_task_than_configured_is_refused(tmp_path: Path) -> None:
    from neuronserve.deploy.commands import plan_for
    from neuronserve.deploy.local import DeployError

    classifier = trace_tiny(tmp_path, "text-classification", num_labels=1).directory
    settings = make_settings(
        tmp_path,
        serve__artifacts=str(classifier),  # a directory given for model.*: it defines the model
        models__rr__source="/m",
        models__rr__task="feature-extraction",  # but a stale trace: the artifacts classify
        models__rr__artifacts=str(classifier),
    )
    with pytest.raises(DeployError, match=r"model rr: the artifacts in .* are a text-classification model"):
        plan_for(settings, verify=False, host_memory=64 * GIB)
    fixed = make_settings(
        tmp_path,
        serve__artifacts=str(classifier),
        models__rr__source="/m",
        models__rr__task="text-classification",
        models__rr__artifacts=str(classifier),
    )
    plan_for(fixed, verify=False, host_memory=64 * GIB)
