"""``neuronserve doctor`` on recorded neuron-ls outputs and stand-in package lists, and on this host."""

from __future__ import annotations

import json
from pathlib import Path

from neuronserve.doctor import FAIL, INFO, OK, WARN, Check, Host, check_host, report
from tests.conftest import REPO, make_settings, run_cli

FIXTURES = REPO / "tests" / "fixtures" / "neuron-ls"


def _inf2(versions: dict[str, str], neuron_ls: str | None = None, code: int = 0, err: str = "") -> Host:
    text = neuron_ls if neuron_ls is not None else (FIXTURES / "inf2.48xlarge.json").read_text()
    return Host(
        devices=lambda: [f"/dev/neuron{i}" for i in range(12)],
        neuron_ls=lambda: (code, text, err),
        version=versions.get,
        importable=lambda name: name in {"torch_neuronx", "supervisor"},
        which=lambda name: f"/usr/sbin/{name}",
        runtime_library=lambda: ["/opt/aws/neuron/lib/libnrt.so.1"],
        python=lambda: "3.10.12",
    )


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


MATCHED = {"torch": "2.1.2+cpu", "torch-neuronx": "2.1.2.2.3.0", "neuronx-cc": "2.14.213.0"}


def test_an_inf2_host_with_a_matching_sdk_is_ready(tmp_path: Path) -> None:
    checks = _by_name(check_host(make_settings(tmp_path), _inf2(MATCHED)))
    assert checks["backend"].detail.startswith("neuronx (auto: torch_neuronx is importable and 12")
    assert checks["neuroncores"].detail == "24 cores; device memory per core 16.0 GiB"
    assert checks["cores free"].status == OK
    assert all(c.status in (OK, INFO) for c in checks.values()), checks
    assert checks["artifacts"].status == INFO and "trace them" in checks["artifacts"].fix


def test_cores_held_by_another_process_are_named(tmp_path: Path) -> None:
    devices = json.loads((FIXTURES / "inf2.48xlarge.json").read_text())
    devices[3]["neuron_processes"] = [
        {"pid": 4242, "command": "python serve.py", "neuron_runtime_version": "2.20"}
    ]
    checks = _by_name(check_host(make_settings(tmp_path), _inf2(MATCHED, json.dumps(devices))))
    held = checks["cores free"]
    assert held.status == WARN and "[6, 7] by pid 4242 (python serve.py)" in held.detail
    assert "deploy.cores" in held.fix


def test_a_missing_driver_and_a_torch_the_sdk_was_not_built_for(tmp_path: Path) -> None:
    stderr = (FIXTURES / "driver-missing.stderr").read_text()
    host = _inf2({**MATCHED, "torch": "2.5.1"}, neuron_ls="", code=1, err=stderr)
    checks = _by_name(check_host(make_settings(tmp_path), host))
    assert (
        checks["neuron-ls"].status == FAIL
        and "failed to discover Neuron devices" in checks["neuron-ls"].detail
    )
    assert "lsmod | grep neuron" in checks["neuron-ls"].fix
    mismatch = checks["torch matches SDK"]
    assert mismatch.status == FAIL and "built for torch 2.1.2, not 2.5.1" in mismatch.detail
    assert "problem(s) to fix" in report(list(checks.values()))


def test_a_neuron_host_without_its_sdk_is_not_ready(tmp_path: Path) -> None:
    host = _inf2({"torch": "2.13.0"})
    host.importable = lambda name: name == "supervisor"  # no torch_neuronx, no torch_neuron
    checks = _by_name(check_host(make_settings(tmp_path), host))
    backend = checks["backend"]
    assert backend.status == FAIL and backend.detail.startswith("cpu, although 12 Neuron device(s) exist")
    assert "pip install torch-neuronx neuronx-cc" in backend.fix


def test_artifacts_that_cannot_serve_here_fail_and_others_warn(tmp_path: Path) -> None:
    from tests.conftest import trace_tiny

    artifacts = trace_tiny(tmp_path).directory
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), trace__backend="cpu")
    cpu = Host(devices=list, version=lambda name: {"torch": "2.13.0+cpu"}.get(name, "0.0"))
    checks = _by_name(check_host(settings, cpu))
    assert checks["artifacts"].status == WARN and "transformers" in checks["artifacts"].detail
    other_torch = Host(devices=list, version=lambda name: "2.9.0" if name == "torch" else None)
    checks = _by_name(check_host(settings, other_torch))
    assert checks["artifacts"].status == FAIL and "installed" in checks["artifacts"].detail
    (artifacts / "manifest.json").write_text("{not json")
    checks = _by_name(check_host(settings, cpu))
    assert checks["artifacts"].status == FAIL and "unreadable manifest" in checks["artifacts"].detail


def test_on_this_cpu_host_every_neuron_item_is_explained_and_it_exits_0(tmp_path: Path) -> None:
    result = run_cli("doctor", "--set", "trace.backend=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for item in ("neuron devices", "neuron runtime", "neuron-ls", "neuron sdk", "neuron sdk (inf1)", "nginx"):
        assert f"] {item} " in result.stdout, item
    assert "a cpu host" in result.stdout and "ready to trace and serve" in result.stdout


def test_asking_for_neuronx_on_this_host_fails_naming_what_to_install(tmp_path: Path) -> None:
    result = run_cli("doctor", "--set", "trace.backend=neuronx", cwd=tmp_path)
    assert result.returncode == 1
    assert "fix: pip install torch-neuronx neuronx-cc --extra-index-url" in result.stdout
    assert "fix: run on an Inf1/Inf2/Trn instance" in result.stdout
