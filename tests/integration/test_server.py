"""A real server (subprocess on loopback) serving the traced bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.servers import RunningServer, start_server, tei_client

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Inferentia chips run transformer encoders at low cost per inference, and a serving stack "
    "that batches requests dynamically keeps every NeuronCore busy while bounding latency.",
    "Hi",
]


@pytest.fixture(scope="module")
def server(bundled_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(
        bundled_artifacts, tmp_path_factory.mktemp("srv"), "serve.max_inputs_per_request=16"
    ) as running:
        yield running


def _predict(url: str, inputs: Any, **params: Any) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"inputs": inputs, "parameters": params}, timeout=60)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_match_sentence_transformers(server: RunningServer) -> None:
    from sentence_transformers import SentenceTransformer

    from neuronserve.models import resolve_source

    reference = SentenceTransformer(str(resolve_source("bundled:all-MiniLM-L6-v2")), device="cpu").encode(
        TEXTS
    )
    response = _predict(server.url, TEXTS)
    assert response.status_code == 200, response.text
    served = np.array(response.json()["outputs"], dtype=np.float32)
    assert served.shape == (4, 384)
    for ref, got in zip(reference, served, strict=True):
        assert _cos(ref, got) >= 0.9999
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)  # the model's Normalize module


def test_tei_client_embeds_as_sentence_transformers(server: RunningServer) -> None:
    """huggingface_hub's InferenceClient against the server's TEI routes (POST /, /info)."""
    from sentence_transformers import SentenceTransformer

    from neuronserve.models import resolve_source

    reference = SentenceTransformer(str(resolve_source("bundled:all-MiniLM-L6-v2")), device="cpu").encode(
        TEXTS
    )
    with tei_client(server.url) as client:
        served = client.feature_extraction(TEXTS)
    assert served.shape == (4, 384)
    for ref, got in zip(reference, served, strict=True):
        assert _cos(ref, got) >= 0.9999
    info = httpx.get(f"{server.url}/info").json()  # TEI's fields, as its clients read them
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 128 and info["served_model_name"] == "all-MiniLM-L6-v2"
    assert info["model_id"] == "bundled:all-MiniLM-L6-v2" and info["max_client_batch_size"] == 16


def test_batch_invariance(server: RunningServer) -> None:
    x = TEXTS[0]
    alone = np.array(_predict(server.url, [x]).json()["outputs"][0])
    together = np.array(_predict(server.url, [x, x, x]).json()["outputs"])
    mixed = np.array(_predict(server.url, [TEXTS[2], x, TEXTS[3], x]).json()["outputs"])
    for row in [*together, mixed[1], mixed[3]]:
        assert np.allclose(row, alone, atol=1e-5)


def test_concurrent_clients_are_batched(server: RunningServer) -> None:
    sizes: Counter[int] = Counter()
    codes: Counter[int] = Counter()
    lock = threading.Lock()

    def client(_: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for _ in range(6):
                r = c.post("/predict", json={"inputs": TEXTS[1]})
                with lock:
                    codes[r.status_code] += 1
                    sizes[int(r.headers["x-batch-size"])] += 1

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    assert codes == Counter({200: 96})
    assert max(sizes) > 1, sizes


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        (b"{not json", 422, "body", "malformed JSON"),
        (b'{"inputs": 5}', 422, "inputs", "must be a non-empty string"),
        (b'{"inputs": []}', 422, "inputs", "must not be an empty list"),
        (b'{"inputs": ["ok", ""]}', 422, "inputs[1]", "at least 1 character"),
        (b'{"inputs": ["ok", 3]}', 422, "inputs[1]", "valid string"),
        (b'{"inputs": "ok", "extra": 1}', 422, "extra", "Extra inputs"),
        (
            b'{"inputs": "ok", "parameters": {"timeout_ms": 999999999}}',
            422,
            "parameters.timeout_ms",
            "max_request_timeout_ms",
        ),
        (b'{"inputs": [{"question": "q", "context": "c"}]}', 422, "inputs", "takes strings"),
        # found by a fuzzer: a number is not a boolean, blank text is not text
        (b'{"inputs": "ok", "parameters": {"normalize": 0}}', 422, "parameters.normalize", "boolean"),
        (b'{"inputs": "ok", "parameters": {"truncate": "yes"}}', 422, "parameters.truncate", "boolean"),
        (b'{"inputs": ["ok", "   "]}', 422, "inputs[1]", "must not be blank"),
        (b'{"inputs": [' + b",".join([b'"x"'] * 17) + b"]}", 413, "inputs", "max_inputs_per_request (16)"),
        (
            b'{"inputs": "' + b"word " * 300 + b'"}',
            422,
            "inputs[0]",
            "exceed the largest compiled sequence length 128",
        ),
    ],
)
def test_bad_input_is_a_clear_4xx(
    server: RunningServer, body: bytes, status: int, field: str, words: str
) -> None:
    r = httpx.post(
        f"{server.url}/predict", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["field"] == field
    assert words in payload["error"]
    assert set(payload) == {"error", "type", "field"}


def test_protocol_details_a_fuzzer_checks(server: RunningServer) -> None:
    # /v1/embeddings names its own field, "input"
    long_text = "word " * 300
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["ok", long_text]}, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "input[1]", r.text
    # a method the route does not take: 405 saying which it does
    r = httpx.get(f"{server.url}/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["type"] == "method_not_allowed"
    # v2 health answers are JSON, as the protocol describes them
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json" and r.json() == body


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/predict", "text/plain;charset=UTF-8"),
        ("/predict", "application/x-www-form-urlencoded"),
        ("/v1/embeddings", "multipart/form-data; boundary=x"),
        ("/v2/models/all-MiniLM-L6-v2/infer", "text/plain"),
    ],
)
def test_only_json_bodies_are_served(server: RunningServer, path: str, content_type: str) -> None:
    """What a web page can post cross-origin without asking first: refused, never run."""
    body = b'{"inputs": "hello", "input": "hello"}'
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": content_type}, timeout=30)
    assert r.status_code == 415, r.text
    assert r.json()["type"] == "unsupported_media_type" and r.json()["field"] == "content-type"


def test_too_long_input_is_truncated_only_when_asked(server: RunningServer) -> None:
    long_text = "word " * 300
    r = _predict(server.url, long_text, truncate=True)
    assert r.status_code == 200
    assert len(r.json()["outputs"][0]) == 384


def test_body_limit(server: RunningServer) -> None:
    big = b'{"inputs": "' + b"a" * 1_100_000 + b'"}'
    r = httpx.post(f"{server.url}/predict", content=big, timeout=30)
    assert r.status_code == 413
    assert r.json()["field"] == "body"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while streaming
        yield b'{"inputs": "'
        for _ in range(20):
            yield b"a" * 60_000
        yield b'"}'

    r = httpx.post(f"{server.url}/predict", content=chunks(), timeout=30)
    assert r.status_code == 413


def test_headers_on_every_answer(server: RunningServer) -> None:
    ok = httpx.post(f"{server.url}/predict", json={"inputs": "hello"}, headers={"x-request-id": "abc-123"})
    bad = httpx.post(f"{server.url}/predict", json={"inputs": 5})
    missing = httpx.get(f"{server.url}/nope")
    for r in (ok, bad, missing):
        for header in ("x-request-id", "x-server", "x-queue-ms", "x-inference-ms", "x-batch-size"):
            assert header in r.headers, (r.status_code, header)
    assert ok.headers["x-request-id"] == "abc-123"
    assert float(ok.headers["x-inference-ms"]) > 0
    assert missing.status_code == 404
    assert missing.json()["type"] == "not_found"


def test_openai_client(server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    created = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:2])
    vectors = np.array([d.embedding for d in created.data])
    expected = np.array(_predict(server.url, TEXTS[:2]).json()["outputs"])
    assert vectors.shape == (2, 384)
    assert np.allclose(vectors, expected, atol=1e-6)
    assert created.usage.prompt_tokens > 0
    as_floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[0], encoding_format="float")
    assert np.allclose(as_floats.data[0].embedding, expected[0], atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other-model", input="x")


def test_model_discovery_through_the_clients(server: RunningServer) -> None:
    import openai
    import tritonclient.http as httpclient

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["all-MiniLM-L6-v2"]
    assert client.models.retrieve("all-MiniLM-L6-v2").owned_by == "neuronserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    triton = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert triton.get_model_repository_index() == [
        {"name": "all-MiniLM-L6-v2", "version": "1", "state": "READY", "reason": ""}
    ]
    ready_only = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json()
    assert [m["name"] for m in ready_only] == ["all-MiniLM-L6-v2"]


def test_embedding_dimensions_truncate_and_renormalise(server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    full = np.array(client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:2]).data[1].embedding)
    short = np.array(
        client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:2], dimensions=128).data[1].embedding
    )
    assert short.shape == (128,)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)  # the model normalises, so does this
    assert np.allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-6)
    same = (
        client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[1], dimensions=384).data[0].embedding
    )
    assert np.allclose(same, full, atol=1e-6)
    too_many = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x", "dimensions": 385})
    assert too_many.status_code == 422
    assert too_many.json()["field"] == "dimensions" and "384" in too_many.json()["error"]


def test_tokenize_agrees_with_the_tokenizer(server: RunningServer, bundled_artifacts: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundled_artifacts / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    texts = [TEXTS[0], "Café déjà vu, naïve coöperation!"]
    r = httpx.post(f"{server.url}/tokenize", json={"inputs": texts})
    assert r.status_code == 200
    for text, tokens in zip(texts, r.json(), strict=True):
        expected = tokenizer.encode(text)
        assert [t["id"] for t in tokens] == expected.ids
        assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
        for token, (start, stop) in zip(tokens[1:-1], expected.offsets[1:-1], strict=True):
            assert not token["special"]
            assert (token["start"], token["stop"]) == (start, stop)
            assert token["text"] == text[start:stop]
    bare = httpx.post(f"{server.url}/tokenize", json={"inputs": "hello world", "add_special_tokens": False})
    assert [t["text"] for t in bare.json()[0]] == ["hello", "world"]
    assert httpx.post(f"{server.url}/tokenize", json={"inputs": []}).status_code == 422


def test_tritonclient_http(server: RunningServer) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live()
    assert client.is_model_ready("all-MiniLM-L6-v2")
    meta = client.get_model_metadata("all-MiniLM-L6-v2")
    assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    expected = np.array(_predict(server.url, TEXTS[:3]).json()["outputs"])
    for binary in (True, False):
        text = httpclient.InferInput("text", [3], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:3]], dtype=object), binary_data=binary)
        output = httpclient.InferRequestedOutput("embedding", binary_data=binary)
        result = client.infer("all-MiniLM-L6-v2", [text], outputs=[output])
        got = result.as_numpy("embedding")
        assert got.shape == (3, 384)
        assert np.allclose(got, expected, atol=1e-5)
    with pytest.raises(Exception, match="not found"):
        client.get_model_metadata("other")


def test_ready_info_metrics_openapi(server: RunningServer) -> None:
    model = {"status": "ready", "copies_ready": 2, "copies": 2, "unhealthy": {}}
    ready = {
        "status": "ready",
        "copies_ready": 2,
        "copies": 2,
        "unhealthy": {},
        "models": {"all-MiniLM-L6-v2": model},
    }
    assert httpx.get(f"{server.url}/ready").json() == ready
    info = httpx.get(f"{server.url}/info").json()
    assert info["backend"] == "cpu"
    (served,) = info["models"]
    assert served["name"] == "all-MiniLM-L6-v2" and served["task"] == "feature-extraction"
    assert served["copies"] == 2 == info["copies"]  # model.*'s fields stay at the top too
    assert set(served["measured_ms"]) == {"b1-s32", "b8-s32", "b1-s128", "b8-s128"}
    assert info["measured_ms"] == served["measured_ms"] and info["shapes"] == served["shapes"]
    assert info["settings"]["serve"]["api_key"] == ""
    metrics = httpx.get(f"{server.url}/metrics").text
    minilm = 'model="all-MiniLM-L6-v2"'
    for name in (
        f'neuronserve_requests_total{{code="200",{minilm},route="/predict"}}',
        "neuronserve_request_duration_seconds_bucket",
        f"neuronserve_queue_duration_seconds_count{{{minilm}}}",
        f"neuronserve_inference_duration_seconds_count{{{minilm}}}",
        "neuronserve_batch_size_bucket",
        f"neuronserve_queue_depth{{{minilm}}}",
        f"neuronserve_inflight_requests{{{minilm}}}",
        f"neuronserve_copies_ready{{{minilm}}} 2.0",
        f'neuronserve_copy_inferences_total{{copy="0",{minilm}}}',
        'neuronserve_rejections_total{model="",reason="too_large"}',
    ):
        assert name in metrics, name
    spec = httpx.get(f"{server.url}/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"
    }
    assert {"413", "422", "429", "503", "504"} <= set(predict["responses"])
    assert "max_inputs_per_request" not in predict["responses"]["413"]["description"]  # figures, not names
    assert "16 inputs" in predict["responses"]["413"]["description"]
    for path in ("/v1/embeddings", "/v2/models/{model}/infer", "/ready", "/info", "/metrics"):
        assert path in spec["paths"]
    assert {"400", "415"} <= set(predict["responses"])
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2InferRequest")
    # what the schema calls valid, this server serves: its task's inputs, its limits, its size
    parts = spec["components"]["schemas"]
    inputs = parts["PredictRequest"]["properties"]["inputs"]["anyOf"]
    assert "QAInput" not in str(inputs)  # a feature-extraction model takes texts
    assert [b.get("maxItems") for b in inputs if b.get("type") == "array"] == [16]
    assert parts["EmbeddingsRequest"]["properties"]["dimensions"]["anyOf"][0]["maximum"] == 384
    for path in ("/tokenize", "/v2/repository/index"):
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert not spec["paths"]["/v2/repository/index"]["post"]["requestBody"]["required"]
    assert "/v1/models" in spec["paths"]
    assert parts["PredictParameters"]["properties"]["timeout_ms"]["anyOf"][0]["maximum"] == 120000
