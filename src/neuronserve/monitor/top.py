"""``neuronserve top``: a live terminal view of a deployment (like neuron-top, for all of it)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

INFERENCE = ("/predict", "/v1/embeddings", "/rerank", "/v1/rerank", "/v2/models/{model}/infer")
BAD_CODES = tuple(str(c) for c in range(400, 600))


@dataclass
class Scrape:
    at: float
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def total(self, name: str, **match: str | tuple[str, ...]) -> float:
        out = 0.0
        for (metric, labels), value in self.samples.items():
            if metric != name:
                continue
            d = dict(labels)
            if all((d.get(k) in v) if isinstance(v, tuple) else d.get(k) == v for k, v in match.items()):
                out += value
        return out

    def buckets(self, name: str, model: str | None = None) -> dict[float, float]:
        out: dict[float, float] = {}
        for (metric, labels), value in self.samples.items():
            d = dict(labels)
            if metric == f"{name}_bucket" and d.get("route") in INFERENCE and model in (None, d.get("model")):
                le = float(d["le"])
                out[le] = out.get(le, 0.0) + value
        return out


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape | None:
    """The samples at ``url``; None when it does not answer them (down, or refusing: a 401)."""
    try:
        response = httpx.get(url, timeout=2, headers=headers)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    text = response.text
    result = Scrape(time.monotonic())
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            result.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return result


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """A quantile from the change of cumulative histogram buckets (upper bound of its bucket)."""
    deltas = sorted((le, after.get(le, 0.0) - before.get(le, 0.0)) for le in after)
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return math.nan
    for le, count in deltas:
        if count >= q * total:
            return le
    return math.inf


def _row(pairs: list[tuple[Scrape, Scrape]], **match: str) -> str:
    """req/s, p50, p99, queue, in-flight, err/s and mean batch over ``pairs`` of scrapes (one
    per server), of the samples labelled ``match`` (a model) or all."""

    def change(name: str, **more: str | tuple[str, ...]) -> float:
        return sum(b.total(name, **match, **more) - a.total(name, **match, **more) for a, b in pairs)

    seconds = max(1e-9, *(b.at - a.at for a, b in pairs))
    model = match.get("model")
    before: dict[float, float] = {}
    after: dict[float, float] = {}
    for a, b in pairs:
        for mine, theirs in ((before, a), (after, b)):
            for le, count in theirs.buckets("neuronserve_request_duration_seconds", model).items():
                mine[le] = mine.get(le, 0.0) + count
    batches = change("neuronserve_batch_size_count")
    items = change("neuronserve_batch_size_sum")
    queue = sum(b.total("neuronserve_queue_depth", **match) for _a, b in pairs)
    inflight = sum(b.total("neuronserve_inflight_requests", **match) for _a, b in pairs)
    return (
        f"{change('neuronserve_requests_total', route=INFERENCE) / seconds:>8.1f}"
        f"{quantile(0.5, before, after) * 1000:>9.1f}{quantile(0.99, before, after) * 1000:>9.1f}"
        f"{queue:>7.0f}{inflight:>10.0f}{change('neuronserve_requests_total', code=BAD_CODES) / seconds:>7.1f}"
        f"{(items / batches if batches else 0):>7.1f}"
    )


def _models(scrapes: list[Scrape]) -> list[str]:
    """The models the servers serve, in the order their info series list them."""
    names: dict[str, None] = {}
    for scrape_ in scrapes:
        for metric, labels in scrape_.samples:
            if metric == "neuronserve_server_info":
                names[dict(labels)["model"]] = None
    return list(names)


def frame(
    plan: Mapping[str, object], before: Mapping[str, Scrape | None], after: Mapping[str, Scrape | None]
) -> str:
    servers = plan["servers"]
    assert isinstance(servers, list)
    lines = [
        f"neuronserve top - deployment {plan['deployment']} ({plan['backend']}) - endpoint http://{plan['host']}:{plan['port']}",
        "",
    ]
    header = f"{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'queue':>7}{'in-flight':>10}{'err/s':>7}{'batch':>7}"
    lines.append(f"{'server':<10}{'cores':<8}{header}")
    pairs: list[tuple[Scrape, Scrape]] = []
    for server in servers:
        a, b = before.get(server["name"]), after.get(server["name"])
        if a is None or b is None:
            lines.append(f"{server['name']:<10}{server['cores']:<8}{'down':>8}")
            continue
        pairs.append((a, b))
        lines.append(f"{server['name']:<10}{server['cores']:<8}{_row([(a, b)])}")
    models = _models([b for _a, b in pairs])
    if pairs and len(models) > 1:  # one model: its row would repeat the servers' total
        lines += ["", f"{'model (all servers)':<18}{header}"]
        lines += [f"{name[:17]:<18}{_row(pairs, model=name)}" for name in models]
    exporter = after.get("exporter")
    lines.append("")
    if exporter is None:
        lines.append("exporter: not reachable (monitor.enabled=false?)")
    else:
        cores = sorted(
            ((dict(k[1]), v) for k, v in exporter.samples.items() if k[0] == "neuroncore_utilization_ratio"),
            key=lambda kv: int(kv[0]["neuroncore"]),
        )
        cpus = sorted(
            (
                (dict(k[1]), v)
                for k, v in exporter.samples.items()
                if k[0] == "neuronserve_host_cpu_utilization_ratio"
            ),
            key=lambda kv: int(kv[0]["cpu"]),
        )
        for labels, value in cores:
            lines.append(f"nc{labels['neuroncore']:<4} {'#' * round(value * 40):<40} {value:6.1%}")
        for labels, value in cpus:
            lines.append(f"cpu{labels['cpu']:<3} {'#' * round(value * 40):<40} {value:6.1%}")
    return "\n".join(lines)


def run(run_dir: Path, exporter_url: str | None, interval_s: float, once: bool, *, api_key: str = "") -> int:
    """``api_key``: sent to the servers (serve.metrics_need_key), never to the exporter."""
    keyed = {"Authorization": f"Bearer {api_key}"} if api_key else None
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        print(f"no deployment in {run_dir}; run ./fast-api/deploy.sh first", file=sys.stderr)
        return 3
    plan = json.loads(plan_path.read_text())
    urls = {s["name"]: f"http://127.0.0.1:{s['port']}/metrics" for s in plan["servers"]}
    if exporter_url:
        urls["exporter"] = exporter_url
    headers = {name: None if name == "exporter" else keyed for name in urls}
    before = {name: scrape(url, headers[name]) for name, url in urls.items()}
    while True:
        time.sleep(interval_s)  # the sampling interval of the view
        after = {name: scrape(url, headers[name]) for name, url in urls.items()}
        text = frame(plan, before, after)
        if once:
            print(text)
            return 0
        sys.stdout.write("\x1b[2J\x1b[H" + text + "\n")
        sys.stdout.flush()
        before = after
