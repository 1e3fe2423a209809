"""The route table: dispatch, auth and the OpenAPI document all come from it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from neuronserve.serving.protocols.common import Call, Reply
from neuronserve.serving.routes import Route, Router
from tests.conftest import make_settings, ready_client, trace_tiny

KEY = "s3cret"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trace_tiny(tmp_path_factory.mktemp("routes")).directory  # type: ignore[no-any-return]


@contextmanager
def _client(tmp_path: Path, artifacts: Path, **values: str) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0", **values)
    with ready_client(settings) as client:
        yield client


async def _ok(_call: Call) -> Reply:
    return Reply(200, b"{}")


def test_the_router_matches_templates_and_says_which_methods_a_path_takes() -> None:
    router = Router(
        [
            Route("POST", "/predict", "predict", "p", _ok),
            Route("POST", "/v2/models/{model}/infer", "v2_infer", "i", _ok),
            Route("GET", "/v2/models/{model}", "v2_model", "m", _ok),
        ]
    )
    route, params, others = router.match("POST", "/v2/models/tiny/infer")
    assert route is not None and route.summary == "i" and params == {"model": "tiny"} and others == []
    assert route.operation_id == "v2_infer_v2_models__model__infer_post"  # as FastAPI named it
    assert router.match("HEAD", "/v2/models/tiny")[0] is not None  # a GET route answers HEAD
    route, _, others = router.match("GET", "/predict")
    assert route is None and [r.method for r in others] == ["POST"]
    route, _, others = router.match("DELETE", "/v2/models/tiny")
    assert route is None and [r.method for r in others] == ["GET"]
    assert router.match("GET", "/nowhere") == (None, {}, [])
    with pytest.raises(ValueError, match="declared twice"):
        Router([Route("POST", "/predict", "a", "a", _ok), Route("POST", "/predict", "b", "b", _ok)])
    with pytest.raises(ValueError, match="before any key check"):  # a probe is never behind the key
        Router([Route("GET", "/health", "health", "h", probe=lambda: Reply(200, b""))])


@pytest.mark.parametrize("need_key", [False, True])
def test_metrics_is_open_or_closed_by_the_setting(tmp_path: Path, artifacts: Path, need_key: bool) -> None:
    with _client(
        tmp_path, artifacts, serve__api_key=KEY, serve__metrics_need_key=str(need_key).lower()
    ) as client:
        bare = client.get("/metrics")
        assert bare.status_code == (401 if need_key else 200), bare.text
        keyed = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200 and "neuronserve_requests_total" in keyed.text
        spec = client.get("/openapi.json").json()  # the document says so too
        metrics = spec["paths"]["/metrics"]["get"]
        assert ("401" in metrics["responses"]) is need_key
        # what is not declared open is closed: a path that is no route asks for the key first
        assert client.get("/nowhere").status_code == 401
        assert client.get("/nowhere", headers={"x-api-key": KEY}).status_code == 404
        assert client.get("/health").status_code == 200  # probes stay open
        wrong = client.post("/health")  # an open path under another method: 405 saying which
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert client.post("/v1/models").status_code == 401  # a closed one: the key first
        security = spec["paths"]["/predict"]["post"]["security"]  # the document says how to send it
        assert (
            security == [{"bearer": []}, {"apiKey": []}] and "bearer" in spec["components"]["securitySchemes"]
        )


def test_every_documented_operation_is_a_route_and_answers(tmp_path: Path, artifacts: Path) -> None:
    """The document is the table: each operation it lists is served (a path template filled in
    with the served model), and routes a model of this server cannot answer are left out."""
    with _client(tmp_path, artifacts) as client:
        spec = client.get("/openapi.json").json()
        assert "/rerank" not in spec["paths"] and "/v1/rerank" not in spec["paths"]  # no cross-encoder
        assert "/v1/embeddings" in spec["paths"]
        for path, operations in spec["paths"].items():
            for method in operations:
                url = path.replace("{model}", "tiny")
                r = client.request(method, url, json={} if method == "post" else None)
                assert r.status_code not in (404, 405), (method, path, r.status_code)
        assert client.post("/rerank", json={"query": "q", "texts": ["t"]}).json()["type"] == "not_found"


def test_what_the_v2_schema_calls_valid_a_question_answering_model_serves(tmp_path: Path) -> None:
    """The v2 infer body of a QA server: question and context of one count each is valid and
    served; a repeated input or counts that differ (both 422s) are invalid in the document too."""
    from jsonschema import Draft202012Validator

    qa = trace_tiny(tmp_path, "question-answering", trace__sequence_lengths="32").directory
    with _client(tmp_path, qa) as client:
        spec = client.get("/openapi.json").json()
        root = {"$ref": "#/components/schemas/V2InferRequest", "components": spec["components"]}
        validator = Draft202012Validator(root)

        def tensor(name: str, texts: list[str]) -> dict[str, Any]:
            return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}

        good = {"inputs": [tensor("question", ["who?", "what?"]), tensor("context", ["a b", "c d"])]}
        assert validator.is_valid(good)
        assert client.post("/v2/models/tiny/infer", json=good).status_code == 200
        for bad in (
            {"inputs": [tensor("question", ["who?"]), tensor("question", ["what?"])]},
            {"inputs": [tensor("question", ["who?"]), tensor("context", ["a", "b"])]},
            {"inputs": [tensor("text", ["a"])]},
        ):
            assert not validator.is_valid(bad), bad
            assert client.post("/v2/models/tiny/infer", json=bad).status_code == 422, bad
        outputs = {**good, "outputs": [{"name": "answer", "parameters": {"binary_data": False}}]}
        assert (
            validator.is_valid(outputs)
            and client.post("/v2/models/tiny/infer", json=outputs).status_code == 200
        )
