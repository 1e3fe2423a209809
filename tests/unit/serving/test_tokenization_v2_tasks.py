"""Tokenization never truncates silently; the v2 codec; task post-processing invariants."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from neuronserve.models import resolve_source
from neuronserve.serving.errors import STATUS, ServeError
from neuronserve.serving.protocols.kserve_wire import V2Tensor, encode_infer, parse_infer
from neuronserve.serving.tasks import FeatureExtraction, ItemOptions, QuestionAnswering, TextClassification
from neuronserve.serving.tokenization import Encoded, TextEncoder

BUNDLED = resolve_source("bundled:all-MiniLM-L6-v2")


def test_bundled_tokenizer_file_truncates_and_pads_but_serving_does_not() -> None:
    baked = json.loads((BUNDLED / "tokenizer.json").read_text())
    assert baked["truncation"]["max_length"] == 128  # the trap this guards against
    encoder = TextEncoder(BUNDLED, 128)
    (short,) = encoder.encode(["hello world"], truncate=False)
    assert short.length == 4  # [CLS] hello world [SEP], not padded to 128
    with pytest.raises(ServeError) as excinfo:
        encoder.encode(["ok", "word " * 200], truncate=False)
    assert excinfo.value.field == "inputs[1]"
    assert "202 tokens exceed the largest compiled sequence length 128" in excinfo.value.message
    (cut,) = encoder.encode(["word " * 200], truncate=True)
    assert cut.length == 128


def test_a_huge_text_costs_only_its_first_tokens_and_tokenizes_the_same() -> None:
    from tokenizers import Tokenizer

    encoder = TextEncoder(BUNDLED, 128)
    text = "Static shapes pad every request to a compiled length, unbelievably, 123 times. " * 13_000  # 1 MB
    prefix = encoder.bounded(text)
    assert len(prefix) < 4096 < len(text)
    reference = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))  # its own truncation at 128
    (cut,) = encoder.encode([text], truncate=True)
    assert cut.ids.tolist() == reference.encode(text).ids  # the same 128 tokens as the whole text
    with pytest.raises(ServeError) as excinfo:
        encoder.encode([text], truncate=False)
    assert excinfo.value.field == "inputs[0]"
    assert "more than 247 tokens exceed the largest compiled sequence length 128" in excinfo.value.message
    # words longer than the guess still end up whole: the look widens until it has enough
    long_words = "antidisestablishmentarianism " * 2000
    (cut,) = encoder.encode([long_words], truncate=True)
    assert cut.ids.tolist() == reference.encode(long_words).ids


def test_pairs_keep_offsets_and_cut_only_the_context() -> None:
    encoder = TextEncoder(BUNDLED, 32)
    (pair,) = encoder.encode_pairs([("who?", "the fox " * 40)], truncate=True)
    assert pair.length == 32
    assert pair.sequence_ids is not None and pair.sequence_ids.count(0) == 2  # the question, whole
    with pytest.raises(ServeError, match="the question or query"):
        encoder.encode_pairs([("why " * 40, "c")], truncate=True)


def test_v2_binary_round_trip() -> None:
    texts = ["héllo", "world"]
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "text",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = parse_infer(header + raw, str(len(header)))
    assert request.inputs == {"text": texts}
    assert request.binary_outputs == {"embedding"}
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, headers = encode_infer(
        "m", "r1", [V2Tensor("embedding", "FP32", [2, 3], matrix)], request.binary_outputs
    )
    json_len = int(headers["inference-header-content-length"])
    meta = json.loads(body[:json_len])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 24
    assert np.array_equal(np.frombuffer(body[json_len:], dtype=np.float32).reshape(2, 3), matrix)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, "inputs.text"),
        (
            {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
            "inputs.text.datatype",
        ),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [""]}]}, "inputs.text"),
        ({"inputs": []}, "inputs"),
        # each of these answered 500 before (found by hand, and by a fuzzer)
        ({"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}, "inputs.text"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["  "]}]}, "inputs.text"),
        (
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "parameters": [1]},
            "parameters",
        ),
        (
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "parameters": "x"},
            "parameters",
        ),
        (
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"], "parameters": 3}]},
            "inputs.t.parameters",
        ),
        (
            {
                "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": "embedding", "parameters": 7}],
            },
            "outputs[0].parameters",
        ),
        (
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "outputs": 1},
            "outputs",
        ),
    ],
)
def test_v2_bad_requests_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ServeError) as excinfo:
        parse_infer(json.dumps(doc).encode(), None)
    assert excinfo.value.field == field
    assert excinfo.value.status == 422


def test_v2_binary_text_that_is_not_utf8_is_a_422() -> None:
    raw = struct.pack("<I", 2) + b"\xff\xfe"
    header = {
        "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]
    }
    head = json.dumps(header).encode()
    with pytest.raises(ServeError) as excinfo:
        parse_infer(head + raw, str(len(head)))
    assert excinfo.value.status == 422 and "not UTF-8" in excinfo.value.message


def test_error_taxonomy_statuses() -> None:
    assert STATUS["overloaded"] == 429 and STATUS["deadline_exceeded"] == 504 and STATUS["unavailable"] == 503
    with pytest.raises(ValueError, match="this is a bug"):
        ServeError("teapot", "no")


def _enc(n: int) -> Encoded:
    return Encoded(ids=np.ones(n, dtype=np.int64), type_ids=np.zeros(n, dtype=np.int64))


def test_mean_pooling_ignores_padding_tokens_and_rows() -> None:
    task = FeatureExtraction("mean", normalize=False)
    hidden = torch.randn(4, 6, 3)
    mask = torch.zeros(4, 6, dtype=torch.long)
    mask[0, :2] = 1
    mask[1, :5] = 1
    out = task.results(
        (hidden,), mask.numpy(), [(_enc(2), ItemOptions()), (_enc(5), ItemOptions(normalize=True))]
    )
    assert len(out) == 2  # padding rows 2 and 3 produce nothing
    assert np.allclose(out[0], hidden[0, :2].mean(0).numpy(), atol=1e-6)
    assert np.isclose(np.linalg.norm(out[1]), 1.0)
    hidden[0, 2:] = 1e6  # garbage in padding positions must not matter
    again = task.results((hidden,), mask.numpy(), [(_enc(2), ItemOptions())])
    assert np.allclose(again[0], out[0], atol=1e-6)


def test_pooling_config_is_read_from_the_sentence_transformers_files(tmp_path: Path) -> None:
    task = FeatureExtraction.from_directory(BUNDLED)
    assert (task.mode, task.normalize) == ("mean", True)
    assert (
        FeatureExtraction.from_directory(tmp_path).mode,
        FeatureExtraction.from_directory(tmp_path).normalize,
    ) == ("mean", False)


def test_classification_top_k() -> None:
    task = TextClassification({0: "neg", 1: "pos", 2: "neutral"}, multi_label=False)
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    (labels,) = task.results((logits,), np.ones((1, 1), np.int64), [(_enc(1), ItemOptions(top_k=2))])
    assert [x["label"] for x in labels] == ["pos", "neutral"]
    assert labels[0]["score"] == pytest.approx(float(torch.softmax(logits, -1)[0, 1]))


def test_qa_span_is_inside_the_context() -> None:
    context = "Paris is the capital"
    enc = Encoded(
        ids=np.ones(7, dtype=np.int64),
        type_ids=np.zeros(7, dtype=np.int64),
        offsets=[(0, 0), (0, 5), (0, 0), (0, 5), (6, 8), (9, 12), (13, 20)],
        sequence_ids=[None, 0, None, 1, 1, 1, 1],
    )
    start = torch.full((1, 8), -5.0)
    end = torch.full((1, 8), -5.0)
    start[0, 1] = 10.0  # the best start logit is in the question: must be ignored
    start[0, 3] = 5.0
    end[0, 3] = 5.0
    (answer,) = QuestionAnswering().results(
        (start, end), np.ones((1, 8), np.int64), [(enc, ItemOptions(context=context))]
    )
    assert answer["answer"] == "Paris" and (answer["start"], answer["end"]) == (0, 5)


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_serving_pools_as_the_tracer_verified(mode: str) -> None:
    """Serving pools in numpy; the tracer verified the model with torch's pooling: the same rows."""
    from neuronserve.models import pool_hidden

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 9, 16, generator=generator)
    lengths = [9, 1, 4, 7, 2]
    mask = torch.zeros(5, 9, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    items = [(_enc(length), ItemOptions(normalize=row % 2 == 0)) for row, length in enumerate(lengths)]
    got = np.stack(FeatureExtraction(mode, normalize=False).results((hidden,), mask.numpy(), items))
    expected = pool_hidden(hidden, mask, mode)
    expected = torch.where(
        torch.tensor([row % 2 == 0 for row in range(5)]).unsqueeze(1),
        torch.nn.functional.normalize(expected, p=2.0, dim=1),
        expected,
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
