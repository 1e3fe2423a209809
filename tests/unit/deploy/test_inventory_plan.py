"""Inventory from recorded neuron-ls -j outputs, and the plans (and errors) made from them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from neuronserve.backends import BackendKind
from neuronserve.config import ConfigError
from neuronserve.deploy import inventory as inv
from neuronserve.deploy.inventory import Inventory, InventoryError, parse_neuron_ls
from neuronserve.deploy.plan import make_plan
from tests.conftest import REPO, make_settings

FIXTURES = REPO / "tests" / "fixtures" / "neuron-ls"


def load(shape: str) -> Inventory:
    return parse_neuron_ls((FIXTURES / f"{shape}.json").read_text())


@pytest.mark.parametrize(
    ("shape", "cores", "per_device", "core_23_device"),
    [("inf2.xlarge", 2, 2, None), ("inf2.48xlarge", 24, 2, 11), ("inf1.6xlarge", 16, 4, None)],
)
def test_cores_are_summed_over_devices(
    shape: str, cores: int, per_device: int, core_23_device: int | None
) -> None:
    found = load(shape)
    assert found.cores == tuple(range(cores))  # not the number of devices
    assert found.cores_per_device == per_device
    if core_23_device is not None:
        assert found.device_of[23] == core_23_device


def test_inf1_numbering_without_core_ids() -> None:
    found = load("inf1.6xlarge")
    assert [found.device_of[c] for c in (0, 3, 4, 7, 15)] == [0, 0, 1, 1, 3]


def test_driver_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "neuron-ls"
    fake.write_text(f"#!/bin/sh\ncat {FIXTURES / 'driver-missing.stderr'} >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(InventoryError, match=r"failed to discover Neuron devices.*Neuron driver loaded"):
        inv.neuron_inventory()


def test_no_neuron_ls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InventoryError, match="install aws-neuronx-tools"):
        inv.neuron_inventory()


@pytest.mark.parametrize("text", ["", "[]", "not json"])
def test_bad_neuron_ls_output(text: str) -> None:
    with pytest.raises(InventoryError):
        parse_neuron_ls(text)


def test_plan_inf2_48xlarge_two_cores_per_server(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, deploy__cores_per_server="2", serve__models_per_server="3")
    plan = make_plan(settings, load("inf2.48xlarge"), BackendKind.NEURONX)
    assert len(plan.servers) == 12
    s5 = plan.servers[5]
    assert (str(s5.cores), s5.devices, s5.port, s5.copies) == ("10-11", (5,), 8086, 3)
    assert plan.idle_cores == ()


def test_plan_inf1_server_spanning_devices(tmp_path: Path) -> None:
    plan = make_plan(
        make_settings(tmp_path, deploy__cores_per_server="8"), load("inf1.6xlarge"), BackendKind.NEURON
    )
    assert [(str(s.cores), s.devices) for s in plan.servers] == [("0-7", (0, 1)), ("8-15", (2, 3))]


def test_auto_is_one_server_with_every_core(tmp_path: Path) -> None:
    plan = make_plan(
        make_settings(tmp_path, deploy__servers="auto"), load("inf2.48xlarge"), BackendKind.NEURONX
    )
    assert [str(s.cores) for s in plan.servers] == ["0-23"]
    assert plan.servers[0].devices == tuple(range(12))


def test_n_servers_may_leave_cores_idle(tmp_path: Path) -> None:
    plan = make_plan(
        make_settings(tmp_path, deploy__servers="3", deploy__cores_per_server="4"),
        load("inf1.6xlarge"),
        BackendKind.NEURON,
    )
    assert [str(s.cores) for s in plan.servers] == ["0-3", "4-7", "8-11"]
    assert plan.idle_cores == tuple(range(12, 16))
    assert "idle cores: 12-15" in plan.table()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"deploy__cores_per_server": "5"},
            "24 cores / cores_per_server 5 leaves 4 idle: use 1, 2, 3, 4, 6, 8, 12 or 24",
        ),
        ({"deploy__servers": "13", "deploy__cores_per_server": "2"}, "at most 12 servers of 2 cores fit"),
        ({"deploy__cores_per_server": "25"}, "exceeds the 24 cores available"),
        ({"deploy__cores": "20-30"}, "cores [24, 25, 26, 27, 28, 29, 30] are not on this host"),
        ({"deploy__base_port": "8079"}, "port 8080 collides with deploy.port"),
    ],
)
def test_plan_errors_say_what_fits(tmp_path: Path, values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        make_plan(make_settings(tmp_path, **values), load("inf2.48xlarge"), BackendKind.NEURONX)
    assert message in str(excinfo.value)


def test_deploy_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"deploy\.servers must be max, auto or a positive number"):
        make_settings(tmp_path, deploy__servers="many")
    with pytest.raises(ConfigError, match=r"deploy\.name"):
        make_settings(tmp_path, deploy__name="../etc")


def test_cpu_plan_on_a_subset_of_cpus(tmp_path: Path) -> None:
    cpus = Inventory("cpu", (0, 1, 2, 3), {})
    plan = make_plan(
        make_settings(tmp_path, deploy__cores="2-3", deploy__cores_per_server="1"), cpus, BackendKind.CPU
    )
    assert [(str(s.cores), s.devices, s.copies) for s in plan.servers] == [("2", (), 1), ("3", (), 1)]
    assert str(plan.shared_cores) == "2-3"  # they lend each other those two only


@pytest.mark.parametrize(
    ("cpus", "layout"),
    [(1, [1]), (2, [1, 1]), (3, [1, 1, 1]), (8, [4, 4]), (12, [6, 6]), (24, [8, 8, 8]), (16, [8, 8])],
)
def test_a_cpu_host_gets_at_least_two_servers_of_up_to_eight_cpus_that_lend_each_other_cores(
    tmp_path: Path, cpus: int, layout: list[int]
) -> None:
    """Two servers or more, so one dying loses no request; they lend each other idle CPUs, so a
    lone request still runs on all of them (one event loop feeds 8)."""
    plan = make_plan(make_settings(tmp_path), Inventory("cpu", tuple(range(cpus)), {}), BackendKind.CPU)
    assert [len(s.cores) for s in plan.servers] == layout
    # a copy per CPU of its own; the others' idle CPUs are lent to its batches as threads
    copies = layout
    assert [s.copies for s in plan.servers] == copies and plan.model_copies[0][1] == copies[0]
    assert not plan.idle_cores
    if len(layout) > 1:
        assert plan.shared_cores is not None and plan.shared_cores.ids == tuple(range(cpus))
        assert "lent between the servers" in plan.table()
    else:
        assert plan.shared_cores is None


@pytest.mark.parametrize(
    "setting", [{"deploy__lend_cores": "false"}, {"deploy__launcher": "docker"}, {"deploy__servers": "auto"}]
)
def test_cores_are_lent_only_between_local_cpu_servers_that_are_asked_to(
    tmp_path: Path, setting: dict[str, str]
) -> None:
    plan = make_plan(make_settings(tmp_path, **setting), Inventory("cpu", (0, 1), {}), BackendKind.CPU)
    assert plan.shared_cores is None and "lent" not in plan.table()


def test_neuron_keeps_one_core_and_two_copies_per_server_by_default(tmp_path: Path) -> None:
    plan = make_plan(make_settings(tmp_path), Inventory("neuron", (0, 1, 2, 3), {}), BackendKind.NEURONX)
    assert [(len(s.cores), s.copies) for s in plan.servers] == [(1, 2)] * 4
