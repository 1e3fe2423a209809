"""Prompts and load for generative endpoints: a random dataset of exact token lengths with a fixed
seed, or a prompts file; closed loop over concurrencies and open loop (Poisson) at rates.

Each step sends ``num_prompts`` requests: closed, by ``concurrency`` workers back to back (as
vLLM's ``--max-concurrency``); open, at Poisson arrival times of the given rate, whatever the
server does (each request's intended time is kept; TTFT and E2EL run from its actual send, as the
other clients measure). A step's duration runs from its first send to its last answer.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from neuronserve.loadgen.payloads import Bucket, PayloadError
from neuronserve.loadgen.sse import ROUTES, Api, StreamRecord, request_body, stream_request


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # by the model's tokenizer, before any chat template
    output_len: int


class Tokens:
    """The served model's tokenizer (``tokenizer.json``), for random prompts of exact lengths and
    for counting output tokens when a server sends no usage."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise PayloadError(
                f"{path}: no tokenizer.json; pass --tokenizer DIR (the model's directory) or FILE"
            )
        self._tokenizer = Tokenizer.from_file(str(file))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        self._ordinary = [i for t, i in self._tokenizer.get_vocab().items() if t not in special]
        self._ordinary.sort()

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def random_text(self, rng: random.Random, length: int) -> str:
        """A text of ``length`` tokens: random ordinary tokens, decoded, adjusted until it
        re-encodes to exactly ``length`` (decoding can merge tokens)."""
        ids = [rng.choice(self._ordinary) for _ in range(length)]
        text = self._tokenizer.decode(ids)
        for _ in range(20):
            got = self._tokenizer.encode(text, add_special_tokens=False).ids
            if len(got) == length:
                return text
            if len(got) > length:
                text = self._tokenizer.decode(got[:length])
            else:
                text = self._tokenizer.decode(
                    got + [rng.choice(self._ordinary) for _ in range(length - len(got))]
                )
        return text


def random_prompts(tokens: Tokens, count: int, input_len: int, output_len: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)  # noqa: S311 - test prompts, not a secret
    out = []
    for _ in range(count):
        text = tokens.random_text(rng, input_len)
        out.append(Prompt(text, tokens.count(text), output_len))
    return out


def file_prompts(
    path: Path, text_field: str, output_len: int, tokens: Tokens | None, bucket: Bucket | None
) -> list[Prompt]:
    """Prompts from a JSON-lines file (``text_field``, else ``prompt``; an ``output_len``,
    ``output_tokens`` (vLLM's custom dataset) or ``max_tokens`` field sets that prompt's answer
    length) or a plain-text file (one per line),
    kept when their token count falls in ``bucket``."""
    if not path.is_file():
        raise PayloadError(f"bench.dataset {path}: no such file")
    rows: list[tuple[str, int]] = []
    if path.suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            column = text_field if text_field in (reader.fieldnames or []) else "prompt"
            if column not in (reader.fieldnames or []):
                raise PayloadError(f"{path}: no column {text_field!r} or 'prompt' (bench.text_field)")
            rows = [(row[column], output_len) for row in reader if row[column].strip()]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or path.suffix == ".csv":
            continue
        if path.suffix in {".jsonl", ".ndjson"}:
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise PayloadError(f"{path}:{number}: not JSON ({exc})") from None
            text = row.get(text_field, row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise PayloadError(
                    f"{path}:{number}: no string field {text_field!r} or 'prompt' (bench.text_field)"
                )
            wanted = row.get("output_len", row.get("output_tokens", row.get("max_tokens", output_len)))
            try:
                rows.append((text, int(wanted)))
            except (TypeError, ValueError):
                raise PayloadError(
                    f"{path}:{number}: output_len {wanted!r} is not a number of tokens"
                ) from None
        else:
            rows.append((line, output_len))
    prompts = [Prompt(text, tokens.count(text) if tokens else len(text.split()), n) for text, n in rows]
    if bucket is not None:
        prompts = [p for p in prompts if bucket.low <= p.tokens <= bucket.high]
    if not prompts:
        where = f" in {bucket.label}" if bucket else ""
        raise PayloadError(f"{path}: no prompts{where}")
    return prompts


@dataclass(frozen=True)
class StreamPlan:
    api: Api
    model: str
    mode: str  # closed or open
    level: float  # concurrency, or requests/s
    num_prompts: int
    timeout_s: float
    ignore_eos: bool
    seed: int
    extra: dict[str, Any] | None = None


async def run_stream_step(
    plan: StreamPlan, base_url: str, prompts: Sequence[Prompt], headers: dict[str, str], *, offset: int = 0
) -> tuple[list[StreamRecord], float]:
    """Every request of one step, and its duration (first send to last end). The step sends
    ``prompts`` from ``offset`` on, round the list."""
    url = base_url.rstrip("/") + ROUTES[plan.api]
    order = [prompts[(offset + i) % len(prompts)] for i in range(plan.num_prompts)]
    records: list[StreamRecord] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(plan.timeout_s, connect=min(10.0, plan.timeout_s))
    origin = time.perf_counter()

    async def one(client: httpx.AsyncClient, index: int, intended: float) -> None:
        prompt = order[index]
        body = request_body(
            plan.api, plan.model, prompt.text, prompt.output_len, ignore_eos=plan.ignore_eos, extra=plan.extra
        )
        record = StreamRecord(index=index, intended_s=intended, sent_s=0.0)
        record.prompt_tokens = prompt.tokens
        await stream_request(
            client, url, body, headers, api=plan.api, record=record, timeout_s=plan.timeout_s, origin=origin
        )
        records.append(record)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if plan.mode == "closed":
            queue = iter(range(plan.num_prompts))

            async def worker() -> None:
                for index in queue:
                    await one(client, index, time.perf_counter() - origin)

            await asyncio.gather(*(worker() for _ in range(max(1, int(plan.level)))))
        else:
            rng = random.Random(plan.seed)  # noqa: S311 - a load schedule, not a secret
            at = 0.0
            tasks = []
            for index in range(plan.num_prompts):
                delay = at - (time.perf_counter() - origin)
                if delay > 0:
                    await asyncio.sleep(delay)  # the next Poisson arrival
                tasks.append(asyncio.create_task(one(client, index, at)))
                at += rng.expovariate(plan.level)
            await asyncio.gather(*tasks)
    # From the first send to the last request's end, whatever ended it (an answer, an error, a
    # timeout): failures count in the time as they do in the load.
    first = min((r.sent_s for r in records), default=0.0)
    last = max((r.end_s for r in records), default=first)
    return sorted(records, key=lambda r: r.index), max(1e-9, last - first)


async def served_model(base_url: str, headers: dict[str, str]) -> str:
    """The first model the endpoint lists (``GET /v1/models``); "" when it lists none."""
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
            data = response.json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            return ""
    return str(data[0].get("id", "")) if data and isinstance(data[0], dict) else ""


def warm_up(plan: StreamPlan, base_url: str, prompt: Prompt, headers: dict[str, str]) -> StreamRecord:
    """One request before the sweep (not counted), as vLLM's client sends: it fails the run early
    when the endpoint cannot answer at all."""
    one = StreamPlan(
        plan.api, plan.model, "closed", 1, 1, plan.timeout_s, plan.ignore_eos, plan.seed, plan.extra
    )
    records, _ = asyncio.run(run_stream_step(one, base_url, [prompt], headers))
    return records[0]
