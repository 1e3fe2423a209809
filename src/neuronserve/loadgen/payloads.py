"""What the load client sends: texts from the built-in samples or a dataset, as request bodies."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from neuronserve.loadgen.http import Payload
from neuronserve.models import SAMPLE_TEXTS


class PayloadError(ValueError):
    """The dataset or bucket settings cannot produce requests; the message says why."""


def load_texts(dataset: str, text_field: str) -> list[str]:
    """Texts from a JSON-lines, CSV or plain-text file (one text per line), or the samples."""
    if not dataset:
        return list(SAMPLE_TEXTS)
    path = Path(dataset)
    if not path.is_file():
        raise PayloadError(f"bench.dataset {dataset}: no such file")
    texts: list[str] = []
    if path.suffix in {".jsonl", ".ndjson"}:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise PayloadError(f"{path}:{number}: no string field {text_field!r} (bench.text_field)")
                texts.append(row[text_field])
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or text_field not in reader.fieldnames:
                raise PayloadError(
                    f"{path}: no column {text_field!r} (bench.text_field); columns: {reader.fieldnames}"
                )
            texts = [row[text_field] for row in reader]
    else:
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise PayloadError(f"{path}: no non-empty texts")
    return texts


@dataclass(frozen=True)
class Bucket:
    low: int
    high: int

    @property
    def label(self) -> str:
        return f"{self.low}-{self.high} tokens"


def parse_buckets(text: str) -> list[Bucket]:
    buckets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high):
            raise PayloadError(f"bench.token_buckets {part!r}: write ranges like 1-32,33-128")
        buckets.append(Bucket(int(low), int(high)))
    return buckets


class TokenCounter:
    """Token counts from the model's tokenizer.json when one is at hand, else words."""

    def __init__(self, artifacts: Path | None) -> None:
        self.unit = "words"
        self._tokenizer = None
        if artifacts is not None and (artifacts / "tokenizer.json").is_file():
            from neuronserve.serving.tokenization import load_plain_tokenizer

            self._tokenizer = load_plain_tokenizer(artifacts)
            self.unit = "tokens"

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer.encode(text).ids)


def body_for(route: str, text: str, model: str = "", documents: Sequence[str] = ()) -> bytes:
    """One request's body; ``model`` (when set) names the model; ``documents`` are /rerank's texts."""
    named = {"model": model} if model else {}
    if route == "/v1/embeddings":
        return orjson.dumps({"input": text, **named})
    if route == "/rerank":
        return orjson.dumps({"query": text, "texts": list(documents), **named})
    if route == "v2":
        return orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
    return orjson.dumps({"inputs": text, **named})


def build_payloads(
    texts: list[str],
    route: str,
    counter: TokenCounter,
    bucket: Bucket | None = None,
    *,
    model: str = "",
    documents_per_query: int = 4,
) -> list[Payload]:
    """One payload per text. /rerank: the text is the query, the next ``documents_per_query``
    texts (in a circle) are ranked against it, and the tokens are the longest pair's."""
    payloads = []
    for i, text in enumerate(texts):
        tokens = counter.count(text)
        documents: list[str] = []
        if route == "/rerank":
            documents = [texts[(i + 1 + k) % len(texts)] for k in range(documents_per_query)]
            tokens += max(counter.count(d) for d in documents)
        if bucket is None or bucket.low <= tokens <= bucket.high:
            payloads.append(Payload(body_for(route, text, model, documents), tokens))
    if not payloads:
        where = f" in bucket {bucket.label}" if bucket else ""
        raise PayloadError(f"no input texts{where}; widen bench.token_buckets or use another dataset")
    return payloads
