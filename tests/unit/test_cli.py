"""The command line as a user meets it: every subcommand's --help, ``python -m neuronserve``, one
real call of each subcommand (here, or in the test that needs a deployment or a model for it),
and a missing extra named instead of a traceback."""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

import neuronserve
from neuronserve.cli import build_parser, main
from neuronserve.config import build_settings, parse_properties
from neuronserve.extras import COMMAND_EXTRAS
from tests.conftest import REPO, run_cli, trace_tiny


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of ``parser``: ("trace",), ("k8s",), ("k8s", "check"), ..."""
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: neuronserve {' '.join(command)}"), out[:200]


def test_python_dash_m_neuronserve_is_the_cli() -> None:
    result = run_cli("--version")  # python -m neuronserve.cli
    assert result.returncode == 0 and result.stdout.strip() == f"neuronserve {neuronserve.__version__}"
    import subprocess

    module = subprocess.run(
        [sys.executable, "-m", "neuronserve", "--version"], capture_output=True, text=True, check=False
    )
    assert module.returncode == 0 and module.stdout == result.stdout
    # one version source: the installed metadata is read from neuronserve.__version__
    assert metadata.version("neuronserve") == neuronserve.__version__


# Where each subcommand is run for real, as a user runs it, because it needs a deployment, a model
# or a host tool; the others are run below. The needle is the invocation in that file.
REAL_CALLS_ELSEWHERE = {
    "trace": ("tests/integration/test_two_models.py", 'run_cli("trace"'),
    "deploy": ("tests/integration/test_two_models.py", 'run_cli("deploy", *args'),
    "status": ("tests/integration/test_two_models.py", 'run_cli("status"'),
    "cleanup": ("tests/integration/test_two_models.py", 'run_cli("cleanup"'),
    "bench": ("tests/integration/test_two_models.py", '"bench", "--concurrency", "4"'),
    "serve": ("tests/integration/servers.py", '"neuronserve.cli", "serve"'),
    "monitor": ("tests/integration/test_install.py", '"neuronserve", "monitor"'),
    "tune": ("tests/integration/test_tune.py", '"neuronserve.cli", "tune"'),
    "top": ("tests/integration/test_monitoring.py", '"neuronserve.cli", "top"'),
    "doctor": ("tests/unit/test_doctor.py", 'run_cli("doctor"'),
    "acceptance": ("scripts/hardware-acceptance.sh", "neuronserve acceptance"),  # its test runs the script
    "k8s": ("Makefile", "neuronserve k8s check"),  # make test's k8s target
}
REAL_CALLS_HERE = {"config", "manifest", "dashboards", "image"}


def test_every_subcommand_is_run_for_real_somewhere() -> None:
    top_level = {c[0] for c in COMMANDS}
    assert top_level == set(REAL_CALLS_ELSEWHERE) | REAL_CALLS_HERE
    assert top_level == set(COMMAND_EXTRAS)  # and each names the extra it needs
    for command, (file, needle) in REAL_CALLS_ELSEWHERE.items():
        assert needle in (REPO / file).read_text(), f"{command}: no real call in {file}"
    assert "hardware-acceptance.sh" in (REPO / "tests/integration/test_acceptance.py").read_text()


def test_config_prints_the_template_and_the_effective_settings(tmp_path: Path) -> None:
    template = run_cli("config", "--template", cwd=tmp_path)
    assert template.returncode == 0, template.stderr
    defaults = build_settings({}).as_dict(redact=True)
    assert build_settings(parse_properties(template.stdout)).as_dict(redact=True) == defaults
    effective = run_cli("config", "--set", "trace.backend=cpu", "--set", "serve.api_key=s3cret", cwd=tmp_path)
    assert effective.returncode == 0, effective.stderr
    shown = json.loads(effective.stdout)
    assert shown["trace"]["backend"] == "cpu" and "s3cret" not in effective.stdout
    reference = run_cli("config", "--reference", cwd=tmp_path)
    assert reference.returncode == 0 and "| `model.source` |" in reference.stdout


def test_manifest_verifies_an_artifact_directory(tmp_path: Path) -> None:
    directory = trace_tiny(tmp_path, trace__cpu_engine="torchscript").directory
    ok = run_cli("manifest", str(directory), "--backend", "cpu", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "checksums: all files verified" in ok.stdout and "b1 s16" in ok.stdout
    artifact = next(directory.glob("*.pt"))
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    refused = run_cli("manifest", str(directory), cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert artifact.name in refused.stderr


def test_dashboards_writes_what_is_committed(tmp_path: Path) -> None:
    result = run_cli("dashboards", "--output", str(tmp_path / "monitor"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "monitor" / "grafana" / "dashboards").glob("*.json"))
    assert written and all(
        filecmp.cmp(path, REPO / "monitor" / "grafana" / "dashboards" / path.name, shallow=False)
        for path in written
    )


def test_image_build_without_an_engine_says_it_uses_the_local_environment(tmp_path: Path) -> None:
    import os
    import subprocess

    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = subprocess.run(
        [sys.executable, "-m", "neuronserve", "image", "build", "serve", "--set", "trace.backend=cpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no Docker engine reachable" in result.stdout and "local environment" in result.stdout


def test_a_missing_extra_is_named_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "neuronserve.deploy.commands", None)  # as if never importable
    monkeypatch.setitem(sys.modules, "supervisor", None)
    # a missing module of neuronserve itself is a bug: its traceback stays
    with pytest.raises(ModuleNotFoundError):
        main(["status"])
    monkeypatch.delitem(sys.modules, "neuronserve.deploy.commands")
    monkeypatch.delitem(sys.modules, "neuronserve.deploy.local", raising=False)
    monkeypatch.setitem(sys.modules, "httpx", None)
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "neuronserve status needs the 'deploy' extra, which provides 'httpx': "
        "pip install 'neuronserve[deploy]' (from a checkout: pip install '.[deploy]')"
    )
