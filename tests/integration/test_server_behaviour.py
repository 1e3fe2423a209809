"""Overload, deadlines, draining on SIGTERM, API keys, and the QA/classification tasks."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.trace import run_trace
from tests.conftest import make_settings
from tests.integration.servers import start_server

pytestmark = pytest.mark.integration

MINILM = "all-MiniLM-L6-v2"
LONG = (
    "Static shapes mean every request is padded to a compiled sequence length and batch size, and the "
    "batcher picks the smallest bucket that fits so that short texts do not pay for long ones. " * 2
)


def test_overload_gets_429_with_retry_after_and_no_5xx(bundled_artifacts: Path, tmp_path: Path) -> None:
    with start_server(bundled_artifacts, tmp_path, "serve.max_queue=8", copies=1) as srv:
        results: list[tuple[int, str | None]] = []
        lock = threading.Lock()
        start = threading.Barrier(64)

        def one(_: int) -> None:
            start.wait()
            r = httpx.post(f"{srv.url}/predict", json={"inputs": LONG}, timeout=120)
            with lock:
                results.append((r.status_code, r.headers.get("retry-after")))

        with cf.ThreadPoolExecutor(64) as pool:
            list(pool.map(one, range(64)))
        codes = Counter(code for code, _ in results)
        assert codes[429] > 0, codes
        assert codes[200] > 0, codes
        assert set(codes) <= {200, 429}, codes
        assert all(ra is not None and int(ra) >= 1 for code, ra in results if code == 429)
        assert _metric(srv.url, "neuronserve_rejections_total", reason="queue_full", model=MINILM) >= 1


def test_deadline_gives_504_and_the_expired_input_never_runs(bundled_artifacts: Path, tmp_path: Path) -> None:
    with start_server(bundled_artifacts, tmp_path, copies=1) as srv:

        def items_run() -> float:
            return _metric(srv.url, "neuronserve_copy_items_total")

        def inflight() -> float:
            return _metric(srv.url, "neuronserve_inflight_requests")

        before = items_run()
        # Queue three requests of eight batches of long texts each on the only copy (seconds of
        # work, first come first served), then ask for a 30 ms deadline: it expires behind them
        # whatever the first batch's progress when it arrives.
        with cf.ThreadPoolExecutor(3) as pool:
            busy = [
                pool.submit(httpx.post, f"{srv.url}/predict", json={"inputs": [LONG] * 64}, timeout=120)
                for _ in range(3)
            ]
            deadline_hit = None
            for _ in range(250):  # the busy requests must be queued or running first
                if inflight() == 3:
                    deadline_hit = httpx.post(
                        f"{srv.url}/predict",
                        json={"inputs": "hello", "parameters": {"timeout_ms": 30}},
                        timeout=60,
                    )
                    break
                time.sleep(0.02)  # poll interval
            assert deadline_hit is not None
            assert [b.result().status_code for b in busy] == [200] * 3
        assert deadline_hit.status_code == 504, deadline_hit.text
        assert deadline_hit.json()["type"] == "deadline_exceeded"
        assert items_run() - before == 3 * 64  # the expired input was dropped, not run


def test_sigterm_drains_without_losing_accepted_requests(bundled_artifacts: Path, tmp_path: Path) -> None:
    with start_server(bundled_artifacts, tmp_path, "serve.drain_timeout_s=30", mode="gunicorn") as srv:
        outcomes: Counter[str] = Counter()
        unanswered: list[str] = []  # request ids whose connection closed before an answer
        lock = threading.Lock()
        stop = threading.Event()
        first_ok = threading.Event()

        def client(worker: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    request_id = f"w{worker}-{n}"
                    try:
                        r = c.post(
                            "/predict",
                            json={"inputs": [LONG, "short text"]},
                            headers={"x-request-id": request_id},
                        )
                        kind = str(r.status_code)
                        if r.status_code == 200:
                            first_ok.set()
                    except httpx.ConnectError:
                        kind = "refused"  # never accepted: the listener is closed
                        stop.set()
                    except httpx.HTTPError:
                        kind = "closed"
                        with lock:
                            unanswered.append(request_id)
                    with lock:
                        outcomes[kind] += 1

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, i) for i in range(8)]
            assert first_ok.wait(60)
            srv.process.send_signal(signal.SIGTERM)
            exit_code = srv.process.wait(timeout=60)
            stop.set()
            for f in futures:
                f.result()
        log = srv.log_text()
        assert exit_code == 0, log[-3000:]
        assert "SIGTERM: draining" in log
        assert "drained: no request in flight" in log  # every accepted request finished
        assert outcomes["200"] > 0
        assert set(outcomes) <= {"200", "503", "refused", "closed"}, outcomes
        # A connection closed under a request the app never read is a refusal, not a loss: the
        # access log names every request the app received, whatever its outcome.
        received = [rid for rid in unanswered if f'"request_id":"{rid}"' in log]
        assert received == [], f"accepted and then lost: {received}"
        answered_ok = log.count(f'"route":"/predict","model":"{MINILM}","status":200')
        assert answered_ok == outcomes["200"], (answered_ok, outcomes)


def test_api_key(bundled_artifacts: Path, tmp_path: Path) -> None:
    with start_server(bundled_artifacts, tmp_path, "serve.api_key=s3cret", copies=1) as srv:
        denied = httpx.post(f"{srv.url}/predict", json={"inputs": "hi"})
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"] == "Bearer"
        assert denied.json()["type"] == "unauthorized"
        wrong = httpx.post(
            f"{srv.url}/predict", json={"inputs": "hi"}, headers={"authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        ok = httpx.post(
            f"{srv.url}/predict", json={"inputs": "hi"}, headers={"authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200
        assert (
            httpx.post(
                f"{srv.url}/v1/embeddings", json={"input": "hi"}, headers={"x-api-key": "s3cret"}
            ).status_code
            == 200
        )
        bare = httpx.get(f"{srv.url}/info")  # open, as TEI's clients read it, without the settings
        assert bare.status_code == 200 and "settings" not in bare.json()
        info = httpx.get(f"{srv.url}/info", headers={"x-api-key": "s3cret"}).json()
        assert info["settings"]["serve"]["api_key"] == "***"
        assert httpx.get(f"{srv.url}/ready").status_code == 200  # probes stay open
        # Every documented operation that is not a probe, the schema or metrics needs the key.
        spec = httpx.get(f"{srv.url}/openapi.json").json()
        open_paths = {"/health", "/ready", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready", "/info"}
        for path, operations in spec["paths"].items():
            if path in open_paths:
                continue
            url = srv.url + path.replace("{model}", "all-MiniLM-L6-v2")
            for method in operations:
                r = httpx.request(method, url, json={})
                assert r.status_code == 401, (method, path, r.status_code)
        assert "s3cret" not in srv.log_text()


def test_metrics_that_need_the_key_are_read_with_it_by_our_own_tools(
    bundled_artifacts: Path, tmp_path: Path
) -> None:
    """serve.metrics_need_key: a scraper without the key gets 401 (and `neuronserve top` shows
    the server as not answering, instead of failing on the error body); with it, the samples."""
    from neuronserve.monitor.top import scrape

    extra = ("serve.api_key=s3cret", "serve.metrics_need_key=true")
    with start_server(bundled_artifacts, tmp_path, *extra, copies=1) as srv:
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert scrape(f"{srv.url}/metrics") is None
        keyed = scrape(f"{srv.url}/metrics", {"Authorization": "Bearer s3cret"})
        assert keyed is not None and any(name == "neuronserve_copies_ready" for name, _ in keyed.samples)
        assert httpx.get(f"{srv.url}/health").status_code == 200


def _tiny_artifacts(tmp_path: Path, tiny_model: Callable[..., Path], task: str) -> Path:
    model_dir = tiny_model(tmp_path / task, task)
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        model__task=task,
        trace__backend="cpu",
        trace__batch_sizes="1,4",
        trace__sequence_lengths="32,64",
    )
    return run_trace(settings, progress=False, emit=lambda _l: None).directory


def test_question_answering_server(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    import tritonclient.http as httpclient

    artifacts = _tiny_artifacts(tmp_path, tiny_model, "question-answering")
    context = "Paris is the capital of France and its largest city."
    with start_server(artifacts, tmp_path) as srv:
        r = httpx.post(
            f"{srv.url}/predict",
            json={"inputs": [{"question": "What is the capital of France?", "context": context}] * 3},
        )
        assert r.status_code == 200, r.text
        answers = r.json()["outputs"]
        assert len(answers) == 3
        first = answers[0]
        assert context[first["start"] : first["end"]] == first["answer"]
        assert 0.0 < first["score"] <= 1.0
        assert answers[1] == pytest.approx(first) and answers[2] == pytest.approx(first)
        strings = httpx.post(f"{srv.url}/predict", json={"inputs": "not a pair"})
        assert strings.status_code == 422 and "question" in strings.json()["error"]
        assert httpx.post(f"{srv.url}/v1/embeddings", json={"input": "x"}).status_code == 404

        client = httpclient.InferenceServerClient(url=srv.url.removeprefix("http://"))
        question = httpclient.InferInput("question", [1], "BYTES")
        question.set_data_from_numpy(np.array([b"What is the capital of France?"], dtype=object))
        ctx = httpclient.InferInput("context", [1], "BYTES")
        ctx.set_data_from_numpy(np.array([context.encode()], dtype=object))
        result = client.infer(artifacts.parent.name, [question, ctx])
        assert result.as_numpy("answer")[0].decode() == first["answer"]
        assert int(result.as_numpy("start")[0]) == first["start"]


def test_text_classification_server(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    artifacts = _tiny_artifacts(tmp_path, tiny_model, "text-classification")
    with start_server(artifacts, tmp_path) as srv:
        r = httpx.post(
            f"{srv.url}/predict", json={"inputs": ["a good day", "the dog"], "parameters": {"top_k": 3}}
        )
        assert r.status_code == 200, r.text
        for labels in r.json()["outputs"]:
            assert [x["label"] for x in labels] != [] and len(labels) == 3
            assert {x["label"] for x in labels} == {"LABEL_A", "LABEL_B", "LABEL_C"}
            scores = [x["score"] for x in labels]
            assert scores == sorted(scores, reverse=True)
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        top1 = httpx.post(f"{srv.url}/predict", json={"inputs": "a good day"}).json()["outputs"][0]
        assert len(top1) == 1


def _metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples on /metrics over the samples with ``labels`` (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@pytest.mark.parametrize(("route", "field"), [("/predict", "inputs"), ("/v1/embeddings", "input")])
def test_abandoned_requests_never_run(
    bundled_artifacts: Path, tmp_path: Path, route: str, field: str
) -> None:
    """A client that leaves while its inputs wait: they are dropped before reaching a copy."""
    import json
    import socket

    with start_server(bundled_artifacts, tmp_path, copies=1) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        before = _metric(srv.url, "neuronserve_copy_items_total")
        with cf.ThreadPoolExecutor(1) as pool:
            # Occupy the only copy, then queue 64 texts behind it from a client that then leaves.
            # 64 long texts keep it busy for seconds, well past the client's leaving.
            busy = pool.submit(httpx.post, f"{srv.url}/predict", json={"inputs": [LONG] * 64}, timeout=120)
            for _ in range(500):
                if _metric(srv.url, "neuronserve_inflight_requests") >= 1:
                    break
                time.sleep(0.01)  # poll interval for the busy request to be admitted
            body = json.dumps({field: [f"text number {i}" for i in range(64)]}).encode()
            head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            client = socket.create_connection((host, int(port)))
            client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            for _ in range(500):
                if _metric(srv.url, "neuronserve_inflight_requests") >= 2:
                    break
                time.sleep(0.01)  # poll interval for the abandoned request to be queued
            assert _metric(srv.url, "neuronserve_queue_depth") >= 64
            client.close()
            assert busy.result().status_code == 200
        for _ in range(1000):  # the copy drops them when it next looks at the queue
            dropped = _metric(srv.url, "neuronserve_inputs_dropped_total")
            if dropped >= 64 and _metric(srv.url, "neuronserve_queue_depth") == 0:
                break
            time.sleep(0.01)  # poll interval
        assert dropped == 64
        assert _metric(srv.url, "neuronserve_copy_items_total") - before == 64  # only the busy request ran
        closed = f'neuronserve_requests_total{{code="499",model="{MINILM}",route="{route}"}} 1.0'
        assert closed in httpx.get(f"{srv.url}/metrics").text  # answered as "client closed"


@pytest.mark.parametrize("mode", ["uvicorn", "gunicorn"])
def test_a_server_whose_copy_cannot_load_exits_non_zero(tmp_path: Path, mode: str) -> None:
    """An artifact that passes its checksum but does not load (written by a broken compiler):
    the server must not sit alive and unready for ever; it exits so its supervisor restarts it."""
    import hashlib
    import json
    import subprocess
    import sys

    from tests.conftest import trace_tiny
    from tests.integration.servers import free_port

    artifacts = trace_tiny(tmp_path).directory
    manifest = json.loads((artifacts / "manifest.json").read_text())
    (name,) = manifest["memory"]["artifact_bytes"]
    (artifacts / name).write_bytes(b"not a model archive")
    manifest["files"][name] = hashlib.sha256(b"not a model archive").hexdigest()
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    log = tmp_path / "server.log"
    args = [sys.executable, "-m", "neuronserve.cli", "serve", "--mode", mode, "--port", str(free_port())]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*args, "--artifacts", str(artifacts), "--copies", "1"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        code = process.wait(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert code != 0, text
    assert "copy 0 failed to load: RuntimeError" in text
