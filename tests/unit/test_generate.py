"""Text-generation models: preparing a decoder, the copies x tensor-parallel plan on cores, its
memory refusals, each copy's exact engine command, and the balancer's configuration for streams.
No engine runs here (tests/integration/test_generate.py runs real vLLM copies)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from neuronserve.backends import BackendKind
from neuronserve.config import ConfigError, Settings, load_settings
from neuronserve.deploy.memory import MemoryPlanError
from neuronserve.deploy.nginx import render_nginx_conf
from neuronserve.generate.artifacts import (
    MANIFEST,
    GenerationArtifactError,
    GenerationManifest,
    ModelFacts,
    prepare,
)
from neuronserve.generate.launch import plan_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "neuron-ls"
REPO = Path(__file__).resolve().parents[2]
# Llama-3.1-8B's shape (config.json on the hub): 8.03 B parameters, 32 layers, 8 KV heads of 128.
LLAMA_8B = ModelFacts(
    layers=32,
    hidden=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
    max_positions=131072,
    parameters=8_030_261_248,
    dtype="bfloat16",
)
# SmolLM2-135M-Instruct's shape, as prepare records it from the converted checkpoint.
SMOLLM2 = ModelFacts(30, 576, 9, 3, 64, 49152, 8192, 134_515_008, "float32")
TRN1_32XL = (
    "["
    + ",".join(
        json.dumps(
            {
                "neuron_device": d,
                "bdf": f"0000:{d:02x}:1e.0",
                "nc_count": 2,
                "memory_size": 34359738368,
                "neuroncore_ids": [2 * d, 2 * d + 1],
                "neuron_processes": [],
            }
        )
        for d in range(16)
    )
    + "]"
)


def _recorded(tmp_path: Path, backend: BackendKind, facts: ModelFacts = LLAMA_8B) -> Path:
    """A prepared model's record as trace writes it (the weights are not needed to plan)."""
    directory = tmp_path / "trace-models" / "llama" / backend.value
    directory.mkdir(parents=True)
    manifest = GenerationManifest(
        directory=directory,
        name="llama",
        source="/models/Llama-3.1-8B-Instruct",
        source_sha256="0" * 64,
        backend=backend,
        model_dir=Path("/models/Llama-3.1-8B-Instruct"),
        facts=facts,
        files={},
    )
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json()))
    return directory


def _settings(tmp_path: Path, *overrides: str) -> Settings:
    config = tmp_path / "config.properties"
    config.write_text(
        "model.task=text-generation\nmodel.name=llama\nmodel.source=/models/Llama-3.1-8B-Instruct\n"
    )
    return load_settings(str(config), overrides=list(overrides))


def test_tp8_on_a_trn1_32xlarge_is_four_copies_on_contiguous_ranges_with_the_neuron_vllm_command(
    tmp_path: Path,
) -> None:
    _recorded(tmp_path, BackendKind.NEURONX)
    neuron_ls = tmp_path / "trn1.json"
    neuron_ls.write_text(TRN1_32XL)
    settings = _settings(tmp_path, "trace.backend=neuronx", "deploy.cores_per_server=8")
    plan, _ = plan_for(settings, neuron_ls=neuron_ls, host_memory=512 << 30, verify=False)
    assert [c.cores for c in plan.copies] == ["0-7", "8-15", "16-23", "24-31"]
    assert [c.port for c in plan.copies] == [8081, 8082, 8083, 8084]
    first = plan.copies[0].command
    assert first.env["NEURON_RT_VISIBLE_CORES"] == "0-7"
    compiled = first.env["NEURON_COMPILED_ARTIFACTS"]
    assert re.search(r"/neuron-compiled/tp8-[0-9a-f]{12}$", compiled)
    # compiled graphs are reused only for the shapes they were compiled at
    longer, _ = plan_for(
        _settings(
            tmp_path, "trace.backend=neuronx", "deploy.cores_per_server=8", "generate.max_model_len=4096"
        ),
        neuron_ls=neuron_ls,
        host_memory=512 << 30,
        verify=False,
    )
    assert longer.copies[0].command.env["NEURON_COMPILED_ARTIFACTS"] != compiled
    argv = list(first.argv)
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # nginx is the endpoint
    assert "taskset" not in argv and "--enforce-eager" not in argv
    plan.check()  # 8B in bf16 over 8 cores fits 16 GiB each
    # the per-core estimate: weights and KV cache split over the copy's cores, plus the runtime's
    per_core = plan.copies[0].device_bytes_per_core
    assert 2.0 * (1 << 30) < per_core < 4.0 * (1 << 30)


def test_the_cli_dry_run_prints_each_copy_and_its_command(tmp_path: Path) -> None:
    _recorded(tmp_path, BackendKind.NEURONX)
    neuron_ls = tmp_path / "trn1.json"
    neuron_ls.write_text(TRN1_32XL)
    (tmp_path / "config.properties").write_text(
        "model.task=text-generation\nmodel.name=llama\nmodel.source=/models/Llama-3.1-8B-Instruct\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", "deploy", "--dry-run", "--neuron-ls", str(neuron_ls),
         "--host-memory-gib", "512", "--config", str(tmp_path / "config.properties"),
         "--set", "trace.backend=neuronx", "--set", "deploy.cores_per_server=8"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 copies x 8 cores (tensor-parallel degree)" in out
    for i, cores in enumerate(("0-7", "8-15", "16-23", "24-31")):
        assert f"copy-{i}: " in out and f"NEURON_RT_VISIBLE_CORES={cores} " in out
    assert out.count("--tensor-parallel-size 8") == 4


def test_a_copy_that_does_not_fit_its_neuroncores_is_refused_naming_the_knobs(tmp_path: Path) -> None:
    _recorded(tmp_path, BackendKind.NEURONX)
    neuron_ls = tmp_path / "trn1.json"
    neuron_ls.write_text(TRN1_32XL)
    # one core per copy: 16 GB of bf16 weights on a 16 GiB NeuronCore, with its KV cache
    plan, _ = plan_for(
        _settings(tmp_path, "trace.backend=neuronx", "deploy.cores_per_server=1"),
        neuron_ls=neuron_ls,
        host_memory=512 << 30,
        verify=False,
    )
    with pytest.raises(MemoryPlanError, match=r"a NeuronCore has 16\.0 GiB.*deploy\.cores_per_server"):
        plan.check()


def test_copies_that_do_not_fit_host_memory_are_refused_naming_the_kv_cache_knobs(tmp_path: Path) -> None:
    _recorded(tmp_path, BackendKind.CPU, SMOLLM2)
    settings = _settings(
        tmp_path, "trace.backend=cpu", "generate.max_num_seqs=64", "generate.max_model_len=8192"
    )
    plan, _ = plan_for(settings, host_memory=4 << 30, verify=False)
    # 64 x 8192 tokens x 2 x 30 layers x 3 heads x 64 x 4 bytes = 24 GiB of KV cache per copy
    assert plan.kv_bytes == 64 * 8192 * 2 * 30 * 3 * 64 * 4
    with pytest.raises(
        MemoryPlanError, match=r"host memory.*generate\.max_num_seqs or generate\.max_model_len"
    ):
        plan.check()
    fits, _ = plan_for(_settings(tmp_path, "trace.backend=cpu"), host_memory=16 << 30, verify=False)
    fits.check()


def test_max_model_len_beyond_the_models_positions_is_refused(tmp_path: Path) -> None:
    _recorded(tmp_path, BackendKind.CPU, SMOLLM2)
    with pytest.raises(ConfigError, match=r"generate\.max_model_len=16384 exceeds the model's 8192"):
        plan_for(_settings(tmp_path, "trace.backend=cpu", "generate.max_model_len=16384"), verify=False)


def test_cpu_copies_are_pinned_to_their_cores_with_eager_mode_and_their_kv_cache(tmp_path: Path) -> None:
    _recorded(tmp_path, BackendKind.CPU, SMOLLM2)
    settings = _settings(tmp_path, "trace.backend=cpu", "deploy.cores=0-1", "deploy.cores_per_server=1")
    from neuronserve.deploy.inventory import Inventory
    from neuronserve.generate.plan import make_generation_plan

    manifest = GenerationManifest.read(tmp_path / "trace-models" / "llama" / "cpu")
    inventory = Inventory("cpu", (0, 1), {}, host_memory=16 << 30)
    plan = make_generation_plan(settings, inventory, manifest, Path("/engine/bin/python"))
    assert [c.cores for c in plan.copies] == ["0", "1"]
    second = plan.copies[1].command
    assert list(second.argv[:3]) == ["taskset", "-c", "1"]
    assert second.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert second.env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # 8 x 2048 tokens need well under 1 GiB
    assert "--enforce-eager" in second.argv
    assert second.argv[second.argv.index("--dtype") + 1] == "float32"
    assert second.argv[second.argv.index("--tensor-parallel-size") + 1] == "1"


def test_inf1_has_no_llm_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trace\.backend=neuronx"):
        plan_for(_settings(tmp_path, "trace.backend=neuron"), verify=False)


def _tiny_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_prepare_records_a_local_decoder_checks_its_files_and_skips_it_when_unchanged(tmp_path: Path) -> None:
    source = _tiny_llama(tmp_path / "tiny-llama")
    settings = _settings(tmp_path, f"model.source={source}", "model.name=tiny", "trace.backend=cpu")
    said: list[str] = []
    manifest = prepare(settings, BackendKind.CPU, say=said.append)
    assert manifest.model_dir == source  # a local directory is loaded where it is
    assert (manifest.facts.layers, manifest.facts.kv_heads, manifest.facts.head_dim) == (2, 2, 8)
    assert manifest.facts.parameters == sum(
        p.numel() for p in __import__("transformers").LlamaForCausalLM.from_pretrained(source).parameters()
    )
    assert "model.safetensors" in manifest.files and "config.json" in manifest.files
    again = prepare(settings, BackendKind.CPU, say=said.append)
    assert again == GenerationManifest.read(manifest.directory) and "up to date" in said[-1]
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(GenerationArtifactError, match="differs from its checksum"):
        GenerationManifest.read(manifest.directory).verify()


def test_an_encoder_is_refused_as_a_text_generation_model(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    source = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(source)
    settings = _settings(tmp_path, f"model.source={source}", "model.name=bert", "trace.backend=cpu")
    with pytest.raises(ConfigError, match=r"not a causal language model \(architectures \['BertModel'\]\)"):
        prepare(settings, BackendKind.CPU, say=lambda _line: None)
    assert not (tmp_path / "trace-models" / "bert" / "cpu").exists()  # nothing half-written is left


def test_the_balancer_passes_streams_through_and_checks_the_key_at_the_edge(tmp_path: Path) -> None:
    key = "0123456789abcdef" * 4  # openssl rand -hex 32: longer than an nginx map's hash bucket
    conf = render_nginx_conf(
        listen_host="127.0.0.1",
        listen_port=8080,
        upstreams=["127.0.0.1:8081", "127.0.0.1:8082"],
        run_dir=None,
        max_body_bytes=1 << 20,
        read_timeout_s=3600,
        streams=True,
        api_key=key,
    )
    assert "proxy_buffering off;" in conf and "least_conn;" in conf
    assert f'if ($http_authorization != "Bearer {key}")' in conf and "return 401" in conf
    assert "proxy_read_timeout 3600s;" in conf
    assert "location = /health" in conf  # the probe needs no key
    # a stream a copy had begun is never sent to another (only attempts that reached none are)
    assert "proxy_next_upstream error http_502 http_503;" in conf
    encoders = render_nginx_conf(
        listen_host="127.0.0.1", listen_port=8080, upstreams=["127.0.0.1:8081"], run_dir=None,
        max_body_bytes=1 << 20, read_timeout_s=60,
    )  # fmt: skip
    assert "proxy_buffering off;" not in encoders and "Bearer" not in encoders
    assert "proxy_next_upstream error http_502 http_503 non_idempotent;" in encoders
    with pytest.raises(ConfigError, match=r"serve\.api_key: .*may not contain quotes"):
        render_nginx_conf(
            listen_host="127.0.0.1", listen_port=8080, upstreams=["127.0.0.1:8081"], run_dir=None,
            max_body_bytes=1, read_timeout_s=1, streams=True, api_key='a"b',
        )  # fmt: skip
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (make test installs it): the configuration was not parsed")
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(conf.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;"))
    checked = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_a_tensor_parallel_degree_that_does_not_divide_the_heads_is_refused(tmp_path: Path) -> None:
    _recorded(tmp_path, BackendKind.NEURONX)
    neuron_ls = tmp_path / "trn1.json"
    neuron_ls.write_text(TRN1_32XL)
    with pytest.raises(ConfigError, match=r"must divide the model's 32 attention heads.*1, 2, 4, 8, 16, 32"):
        plan_for(
            _settings(tmp_path, "trace.backend=neuronx", "deploy.cores_per_server=3", "deploy.servers=1"),
            neuron_ls=neuron_ls,
            verify=False,
        )


def test_a_generative_model_is_deployed_alone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deployed alone"):
        _settings(tmp_path, "models.chat.source=/models/x", "models.chat.task=feature-extraction")
    (tmp_path / "config.properties").write_text("model.source=bundled:all-MiniLM-L6-v2\n")
    with pytest.raises(ConfigError, match=r"models\.chat\.task=text-generation cannot sit beside"):
        load_settings(
            str(tmp_path / "config.properties"),
            overrides=["models.chat.source=/models/x", "models.chat.task=text-generation"],
        )


def test_an_engine_python_without_vllm_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from neuronserve.generate.engine import EngineError, ensure_engine

    settings = _settings(tmp_path, f"generate.engine_python={sys.executable}")  # this one has no vLLM
    with pytest.raises(EngineError, match=r"cannot run vLLM: .*point generate\.engine_python"):
        ensure_engine(settings, BackendKind.NEURONX, say=lambda _line: None)


def test_on_neuron_the_first_copy_compiles_alone_and_the_others_start_from_its_graphs(tmp_path: Path) -> None:
    from neuronserve.deploy.local import RunDir, render_supervisord_conf
    from neuronserve.generate.launch import compiles_first, engine_programs

    _recorded(tmp_path, BackendKind.NEURONX)
    neuron_ls = tmp_path / "trn1.json"
    neuron_ls.write_text(TRN1_32XL)
    settings = _settings(tmp_path, "trace.backend=neuronx", "deploy.cores_per_server=8")
    plan, _ = plan_for(settings, neuron_ls=neuron_ls, host_memory=512 << 30, verify=False)
    assert compiles_first(plan)  # nothing compiled for these settings yet
    programs = engine_programs(settings, plan, first_compiles=True)
    assert [p.autostart for p in programs] == [True, False, False, False]
    conf = render_supervisord_conf(
        settings=settings, plan=plan.layout, rd=RunDir(tmp_path / "run"), artifacts=tmp_path, config=None,
        nginx="/usr/sbin/nginx", python=sys.executable, passthrough_env={}, engines=programs,
    )  # fmt: skip
    blocks = {b.split("]", 1)[0]: b for b in conf.split("[program:")[1:]}
    assert "autostart=true" in blocks["copy-0"] and "autostart=false" in blocks["copy-3"]
    assert "neuronserve.generate.keeper -- python3 -m vllm.entrypoints.openai.api_server" in blocks["copy-0"]
    compiled = Path(plan.copies[0].command.env["NEURON_COMPILED_ARTIFACTS"])
    compiled.mkdir(parents=True)
    (compiled / "model.neff").write_bytes(b"\0")
    assert not compiles_first(plan)  # compiled once: every copy starts at once
    _recorded(tmp_path / "cpu", BackendKind.CPU, SMOLLM2)
    cpu_settings = _settings(tmp_path / "cpu", "trace.backend=cpu")
    cpu_plan, _ = plan_for(cpu_settings, host_memory=16 << 30, verify=False)
    assert not compiles_first(cpu_plan)


def _container_config(spec: dict[str, Any]) -> dict[str, Any]:
    """What the docker SDK would send the engine for ``spec`` (a mistyped argument fails here)."""
    from docker.api.client import APIClient
    from docker.models.containers import _create_container_args

    kwargs = {k: v for k, v in spec.items() if k not in {"nginx_conf", "stop_grace_period_s"}}
    create = _create_container_args({"command": None, **kwargs, "version": "1.41"})
    create.pop("name")
    api = APIClient(base_url="tcp://127.0.0.1:9", version="1.41")  # never connects
    config: dict[str, Any] = api.create_container_config(**create)
    return config


def test_in_docker_each_neuron_copy_gets_its_own_devices_renumbered_and_the_compiled_graphs(
    tmp_path: Path,
) -> None:
    from neuronserve.generate.docker_launch import container_specs

    _recorded(tmp_path, BackendKind.NEURONX)
    neuron_ls = tmp_path / "trn1.json"
    neuron_ls.write_text(TRN1_32XL)
    key = "k" * 40
    settings = _settings(
        tmp_path,
        "trace.backend=neuronx",
        "deploy.cores_per_server=8",
        "deploy.launcher=docker",
        f"serve.api_key={key}",
    )
    plan, manifest = plan_for(settings, neuron_ls=neuron_ls, host_memory=512 << 30, verify=False)
    *copies, nginx = container_specs(settings, plan, manifest, (1000, 1000))
    assert [c["name"] for c in copies] == [f"neuronserve-copy-{i}" for i in range(4)]
    second = _container_config(copies[1])
    # cores 8-15 are devices 4-7 (2 cores each), seen inside as neuron0-3 and cores 0-7
    assert [d["PathOnHost"] for d in second["HostConfig"]["Devices"]] == [
        f"/dev/neuron{d}" for d in (4, 5, 6, 7)
    ]
    assert [d["PathInContainer"] for d in second["HostConfig"]["Devices"]] == [
        f"/dev/neuron{i}" for i in range(4)
    ]
    env = dict(e.split("=", 1) for e in second["Env"])
    assert env["NEURON_RT_VISIBLE_CORES"] == "0-7" and env["NEURON_COMPILED_ARTIFACTS"] == "/compiled"
    argv = second["Entrypoint"]
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert (
        argv[argv.index("--tensor-parallel-size") + 1] == "8" and argv[argv.index("--model") + 1] == "/model"
    )
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and "taskset" not in argv
    binds = sorted(second["HostConfig"]["Binds"])
    assert binds == sorted([f"{plan.compiled_dir}:/compiled:rw", "/models/Llama-3.1-8B-Instruct:/model:ro"])
    assert second["User"] == "1000:1000" and second["HostConfig"]["CapDrop"] == ["ALL"]
    assert second["HostConfig"]["ShmSize"] == 12 << 30 and "PortBindings" not in second["HostConfig"]
    assert second["Image"].startswith("public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:")
    assert (
        second["Healthcheck"]["Test"][:3] == ["CMD", "python3", "-c"]
        and "/health" in second["Healthcheck"]["Test"][3]
    )
    # nginx: the four copies by name, streams unbuffered, the key checked at the edge
    conf = nginx["nginx_conf"]
    for i in range(4):
        assert f"server neuronserve-copy-{i}:8080 " in conf
    assert "proxy_buffering off;" in conf and f'"Bearer {key}"' in conf
    assert _container_config(nginx)["HostConfig"]["PortBindings"] == {
        "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(settings.deploy.port)}]
    }


def test_in_docker_a_cpu_copy_is_its_cpuset_and_binds_its_threads_to_it(tmp_path: Path) -> None:
    from neuronserve.deploy.inventory import Inventory
    from neuronserve.generate.docker_launch import container_specs
    from neuronserve.generate.plan import make_generation_plan

    _recorded(tmp_path, BackendKind.CPU, SMOLLM2)
    settings = _settings(tmp_path, "trace.backend=cpu", "deploy.cores_per_server=1", "deploy.launcher=docker")
    manifest = GenerationManifest.read(tmp_path / "trace-models" / "llama" / "cpu")
    plan = make_generation_plan(
        settings, Inventory("cpu", (0, 1), {}, host_memory=16 << 30), manifest, "python3"
    )
    copies = [_container_config(s) for s in container_specs(settings, plan, manifest, (10001, 10001))[:-1]]
    assert [c["HostConfig"]["CpusetCpus"] for c in copies] == ["0", "1"]
    env = dict(e.split("=", 1) for e in copies[1]["Env"])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert (
        copies[1]["Image"] == "neuronserve-engine-cpu:latest" and "--enforce-eager" in copies[1]["Entrypoint"]
    )
    assert "taskset" not in copies[1]["Entrypoint"] and "Devices" not in copies[1]["HostConfig"]


def test_the_k8s_base_is_one_pod_per_copy_asking_for_its_neuroncores_and_passes_the_check(
    tmp_path: Path,
) -> None:
    from neuronserve.deploy.k8s_check import check

    key = "s3cret-key-that-is-long-enough"
    config = tmp_path / "config.properties"
    config.write_text(
        "model.task=text-generation\nmodel.name=llama\nmodel.source=bundled:SmolLM2-135M-Instruct\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", "deploy", "--launcher", "k8s", "--emit", str(tmp_path / "k8s"),
         "--config", str(config), "--set", "trace.backend=neuronx", "--set", "deploy.cores_per_server=8",
         "--set", "deploy.k8s_replicas=4", "--set", f"serve.api_key={key}"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "each pod is one engine copy of llama on 8 NeuronCore(s)" in result.stdout
    base = tmp_path / "k8s"
    deployment = yaml.safe_load((base / "deployment.yaml").read_text())
    assert deployment["metadata"]["name"] == "neuronserve-engine" and deployment["spec"]["replicas"] == 4
    pod = deployment["spec"]["template"]["spec"]
    engine, edge = pod["containers"]
    assert engine["resources"]["limits"]["aws.amazon.com/neuroncore"] == 8
    assert engine["resources"]["requests"]["cpu"] == "9"
    argv = [*engine["command"], *engine["args"]]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[argv.index("--model") + 1] == "/artifacts/llama/neuronx"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "ports" not in engine  # behind the edge
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert "NEURON_RT_VISIBLE_CORES" not in env  # the device plugin's
    assert env["NEURON_COMPILED_ARTIFACTS"] == "/compiled"
    # the key: in no file of the base; the edge reads it from the Secret's file when it starts
    for path in base.iterdir():
        assert not path.is_file() or key not in path.read_text(), path
    assert "@API_KEY@" in (base / "nginx.conf.template").read_text()
    assert {"name": "api-key", "mountPath": "/etc/neuronserve/api-key", "readOnly": True} in edge[
        "volumeMounts"
    ]
    assert [p["containerPort"] for p in edge["ports"]] == [8080, 9100]
    assert "/health" in engine["startupProbe"]["exec"]["command"][2]  # on the engine's loopback
    assert edge["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "generation.json" in pod["initContainers"][0]["command"][2]
    # the trace Job prepares where the pods' init container waits for it, taking no NeuronCore
    from neuronserve.config import env_overrides
    from neuronserve.generate.artifacts import generation_directory

    cluster_env = dict(line.split("=", 1) for line in (base / "settings.env").read_text().splitlines())
    overrides = [f"{k}={v}" for k, (v, _where) in env_overrides(cluster_env).items()]
    job_settings = load_settings(str(config), overrides=overrides)
    assert generation_directory(job_settings, BackendKind.NEURONX) == Path("/trace-models/llama/neuronx")
    assert "/trace-models/$m/generation.json" in pod["initContainers"][0]["command"][2]
    job = yaml.safe_load((base / "trace-job.yaml").read_text())["spec"]["template"]["spec"]
    assert all("aws.amazon.com/neuroncore" not in c["resources"]["limits"] for c in job["containers"])
    monitor = yaml.safe_load((base / "podmonitor-engine.yaml").read_text())
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "copy"} in relabel
    assert "NEURONSERVE_DEPLOY__LAUNCHER=k8s" in (base / "settings.env").read_text()
    assert not (base / "autoscaler.yaml").exists()
    report = check(base)
    assert report.ok, report.text()
    assert "Deployment/neuronserve-engine" in report.objects and "Job/" in " ".join(report.objects)


def test_for_k8s_a_local_model_is_copied_into_the_prepared_directory(tmp_path: Path) -> None:
    source = _tiny_llama(tmp_path / "tiny-llama")
    settings = _settings(
        tmp_path, f"model.source={source}", "model.name=tiny", "trace.backend=cpu", "deploy.launcher=k8s"
    )
    said: list[str] = []
    manifest = prepare(settings, BackendKind.CPU, say=said.append)
    assert manifest.model_dir == manifest.directory  # the pods load what the trace Job wrote
    assert (manifest.directory / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()
    manifest.verify()
    in_place = _settings(tmp_path, f"model.source={source}", "model.name=tiny", "trace.backend=cpu")
    assert prepare(in_place, BackendKind.CPU, say=said.append).model_dir == source  # prepared again, in place
    assert "up to date" not in said[-1]


def _edge_run(tmp_path: Path, template: str, key: str | None) -> subprocess.CompletedProcess[str]:
    """The edge's start script as a pod runs it, on this host: its paths moved under
    ``tmp_path`` and nginx only asked to check the configuration it wrote."""
    from neuronserve.generate import k8s_base

    conf_dir, key_dir = tmp_path / "nginx-template", tmp_path / "api-key"
    conf_dir.mkdir(exist_ok=True)
    key_dir.mkdir(exist_ok=True)
    (conf_dir / k8s_base.TEMPLATE).write_text(
        template.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    )
    if key is not None:
        (key_dir / "api-key").write_text(key)
    script = (
        k8s_base.EDGE_SCRIPT.replace(k8s_base.TEMPLATE_DIR, str(conf_dir))
        .replace("/etc/neuronserve/api-key", str(key_dir))
        .replace("/tmp/nginx.conf", str(tmp_path / "nginx.conf"))
        .replace("exec nginx -c", f"exec {shutil.which('nginx') or '/usr/sbin/nginx'} -t -q -p {tmp_path} -c")
    )
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)


def test_the_pods_nginx_takes_the_key_from_its_secret_when_it_starts_and_refuses_an_empty_one(
    tmp_path: Path,
) -> None:
    from neuronserve.generate import k8s_base

    if not Path(shutil.which("nginx") or "/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (make test installs it): the edge was not started")
    (tmp_path / "logs").mkdir()
    key = "0123456789abcdef" * 4
    keyed = k8s_base.edge_conf(_settings(tmp_path, "serve.api_key=anything", "deploy.launcher=k8s"))
    assert "@API_KEY@" in keyed and "listen 0.0.0.0:9100;" in keyed
    started = _edge_run(tmp_path, keyed, key)
    assert started.returncode == 0, started.stderr
    written = (tmp_path / "nginx.conf").read_text()
    assert f'if ($http_authorization != "Bearer {key}")' in written and "@API_KEY@" not in written
    for bad in ("", "has space", 'quo"te', "back\\slash", "dollar$x"):
        refused = _edge_run(tmp_path, keyed, bad)
        assert refused.returncode == 1 and "is empty or has quotes" in refused.stderr, (bad, refused.stderr)
    open_conf = k8s_base.edge_conf(_settings(tmp_path, "deploy.launcher=k8s"))
    assert "Bearer" not in open_conf
    assert _edge_run(tmp_path, open_conf, None).returncode == 0  # no key configured, no Secret read


def test_for_docker_a_local_model_whose_files_link_elsewhere_is_copied_in(tmp_path: Path) -> None:
    """A Hugging Face cache's snapshot links into its blobs, which a read-only mount of the
    snapshot alone would leave dangling in the container."""
    source = _tiny_llama(tmp_path / "tiny-llama")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (source / "model.safetensors").rename(blobs / "weights")
    (source / "model.safetensors").symlink_to(blobs / "weights")
    docker = _settings(
        tmp_path, f"model.source={source}", "model.name=tiny", "trace.backend=cpu", "deploy.launcher=docker"
    )
    manifest = prepare(docker, BackendKind.CPU, say=lambda _line: None)
    assert manifest.model_dir == manifest.directory
    weights = manifest.directory / "model.safetensors"
    assert not weights.is_symlink() and weights.read_bytes() == (blobs / "weights").read_bytes()
    (source / "model.safetensors").unlink()
    (blobs / "weights").rename(source / "model.safetensors")
    in_place = prepare(docker, BackendKind.CPU, say=lambda _line: None)  # nothing links out any more
    assert in_place.model_dir == source


def test_the_tuner_tries_every_layout_that_divides_the_cores_and_on_neuron_the_heads(tmp_path: Path) -> None:
    from neuronserve.tune.generative import candidates

    cpu = _settings(tmp_path, "trace.backend=cpu")
    assert [(c.copies, c.cores_per_copy, c.max_num_seqs) for c in candidates(cpu, 2, 9, (8,))] == [
        (2, 1, 8),
        (1, 2, 8),
    ]
    neuron = _settings(tmp_path, "trace.backend=neuronx")
    # 32 cores, 32 heads: every power of two; 9 heads (SmolLM2) on 8 cores: tp 1 only
    assert [c.cores_per_copy for c in candidates(neuron, 32, 32, (8,))] == [1, 2, 4, 8, 16, 32]
    assert [c.cores_per_copy for c in candidates(neuron, 8, 9, (4, 16))] == [1, 1]
    assert [c.max_num_seqs for c in candidates(neuron, 8, 9, (4, 16))] == [4, 16]


def test_a_layout_whose_kv_cache_does_not_fit_is_tried_at_the_workloads_length(tmp_path: Path) -> None:
    from neuronserve.deploy.memory import MemoryPlanError
    from neuronserve.tune.generative import GenCandidate, _fitting
    from neuronserve.tune.run import TuneOptions

    _recorded(tmp_path, BackendKind.CPU, SMOLLM2)
    config = tmp_path / "config.properties"
    config.write_text(
        "model.task=text-generation\nmodel.name=llama\nmodel.source=/models/Llama-3.1-8B-Instruct\n"
        "trace.backend=cpu\ndeploy.cores=0-1\n"
    )
    options = TuneOptions(config=str(config), overrides=())
    # 32 sequences of 8192 tokens: 11 GiB of KV cache per copy, two copies on 16 GiB do not fit
    wide = GenCandidate(cores_per_copy=1, copies=2, max_num_seqs=32, max_model_len=8192)
    overrides, fitted = _fitting(options, wide, 256, 0, tmp_path, host_memory=16 << 30)
    assert fitted.max_model_len == 256 and "generate.max_model_len=256" in overrides
    assert "deploy.cores_per_server=1" in overrides and "generate.max_num_seqs=32" in overrides
    roomy = _fitting(options, wide, 256, 0, tmp_path, host_memory=64 << 30)[1]
    assert roomy.max_model_len == 8192  # kept where it fits
    with pytest.raises(MemoryPlanError, match="host memory"):
        _fitting(options, wide, 256, 0, tmp_path, host_memory=4 << 30)  # not even the workload's fits
