"""``neuronserve`` command line: every shell script in the repo is a thin caller of this."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from neuronserve import __version__
from neuronserve.config import (
    ConfigError,
    Settings,
    load_settings,
    render_reference,
    render_template,
    settings_environment,
)
from neuronserve.loadgen import options as bench_options

log = logging.getLogger("neuronserve")

# Errors a user can fix get one line on stderr and a non-zero exit, never a traceback.
EXIT_USAGE = 2
EXIT_FAILURE = 1


# The errors a user can fix, by the module that defines each. Only modules already imported are
# looked at: one that was not cannot have raised, and importing it here could fail on a missing
# extra (a trace-only install has no deploy modules).
_USER_ERRORS = (
    ("neuronserve.artifacts", "ArtifactError"),
    ("neuronserve.backends.base", "BackendError"),
    ("neuronserve.deploy.inventory", "InventoryError"),
    ("neuronserve.deploy.local", "DeployError"),
    ("neuronserve.deploy.memory", "MemoryPlanError"),
    ("neuronserve.generate.artifacts", "GenerationArtifactError"),
    ("neuronserve.generate.engine", "EngineError"),
    ("neuronserve.models", "ModelSourceError"),
    ("neuronserve.serving.tokenization", "TokenizerMissingError"),
    ("neuronserve.trace", "VerificationError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConfigError]
    for module, name in _USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None:
            found.append(getattr(loaded, name))
    return tuple(found)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config.properties to read (default: $NEURONSERVE_CONFIG, else ./config.properties)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set trace.backend=cpu (repeatable)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, overrides=args.overrides)


def cmd_trace(args: argparse.Namespace) -> int:
    from neuronserve.trace import run_trace

    settings = _settings(args)
    if settings.model.task.generates:
        from neuronserve.generate.launch import trace

        return trace(settings, force=args.force, say=print)
    if args.runner != "local" and _trace_in_docker(settings, args):
        return 0
    for name, model in settings.per_model().items():
        if settings.extra_models:
            print(f"== model {name} ==")
        report = run_trace(model, force=args.force, progress=not args.quiet, emit=print)
        print(format_manifest_summary(report.manifest))
    return 0


def _trace_in_docker(settings: Settings, args: argparse.Namespace) -> bool:
    """Trace in the trace image when an engine is reachable; False means trace locally."""
    from neuronserve import containers
    from neuronserve.backends import BackendError, choose_backend
    from neuronserve.models import BUNDLED_PREFIX, is_hub_source, resolve_source

    engine = containers.docker_engine()
    if engine.client is None:
        if args.runner == "docker":
            raise BackendError(f"{engine.reason}; start Docker or use --runner local")
        print(f"{engine.reason}: tracing in the local environment")
        return False
    backend, _ = choose_backend(settings.trace.backend, devices=containers.neuron_devices)
    tag = containers.image_tag("trace", backend)
    if not engine.client.images.list(name=tag):
        raise BackendError(f"image {tag} not built; run ./trace-model/build.sh first")
    output_dir = settings.path(settings.trace.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    local_models: dict[str, tuple[str, Path]] = {}
    hub_repos: list[Path] = []
    for name, model in settings.per_model().items():
        if model.model.source.startswith(BUNDLED_PREFIX):
            continue  # in the image
        # fetched here (unless offline) and resolved: a hub id's snapshot lies in its cache repo
        found = resolve_source(model.model.source, revision=model.model.revision)
        if is_hub_source(model.model.source):
            hub_repos.append(found.parent.parent)  # models--org--name/snapshots/<commit>
        else:
            local_models["model" if name == settings.model_name else f"models.{name}"] = (name, found)
    uid, gid = containers.current_ids()
    config_path = Path(args.config or settings.base_dir / "config.properties")
    spec = containers.trace_container_spec(
        backend=backend,
        repo=Path.cwd(),
        config_path=config_path,
        output_dir=output_dir,
        devices=containers.neuron_devices(),
        uid=uid,
        gid=gid,
        model_dirs=local_models,
        hub_repos=hub_repos,
        environment={
            **settings_environment(settings, "model", "trace"),
        },
        force=args.force,
    )
    print(f"{engine.reason}: tracing in container image {tag}", flush=True)
    code = containers.run_trace_container(engine, spec, emit=lambda line: print(line, flush=True))
    if code != 0:
        raise BackendError(f"the trace container exited with status {code}; its output is above")
    return True


STAGES = ("trace", "serve", "engine", "nginx")


def cmd_image_build(args: argparse.Namespace) -> int:
    from neuronserve import containers
    from neuronserve.backends import choose_backend

    settings = _settings(args)
    backend, why = choose_backend(settings.trace.backend, devices=containers.neuron_devices)
    stage = args.stage or args.stage_option
    if stage == "engine" and backend.neuron_cores:
        raise ConfigError(
            f"the engine on {backend} is AWS's Neuron vLLM image, not one neuronserve builds: "
            "docker pull it (generate.engine_image names it)"
        )
    engine = containers.docker_engine()
    if engine.client is None:
        print(f"{engine.reason}: using the local environment (.venv) for backend {backend} ({why})")
        return 0
    from docker.errors import DockerException  # the engine answered: its SDK is here

    try:
        tag = containers.build_image(
            engine,
            Path.cwd(),
            stage,
            backend,
            base_image=settings.deploy.docker_base_image,
            emit=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except containers.ImageBuildError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except DockerException as exc:  # the engine's own refusal: one line, no traceback
        print(f"building the {stage} image failed: {exc}", file=sys.stderr)
        return 1
    print(f"{engine.reason}: built {tag} from {containers.dockerfile(Path.cwd(), stage, backend)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from neuronserve.serving.runner import run, serve_overrides

    chosen = {
        "model.source": args.model,
        "model.task": args.task,
        "model.revision": args.revision,
        "model.trust_remote_code": "true" if args.trust_remote_code else None,
        "serve.host": args.host,
        "serve.api_key": args.api_key,
        "serve.api_key_file": args.api_key_file,
    }
    given = [f"{key}={value}" for key, value in chosen.items() if value is not None]
    args.overrides = [*args.overrides, *given]
    settings = _settings(args)
    if settings.model.task.generates:
        raise ConfigError(
            "model.task=text-generation is served by copies of an LLM engine, not by neuronserve's "
            "server: ./fast-api/deploy.sh (neuronserve deploy)"
        )
    if args.model:  # one command, as text-embeddings-router --model-id: trace what is missing, serve
        from neuronserve.trace import run_trace

        if settings.serve.artifacts:
            raise ConfigError(
                "--model serves what it traces into trace.output_dir: drop --artifacts (serve.artifacts), "
                "or serve that directory without --model"
            )

        for name, model in settings.per_model().items():
            report = run_trace(model, progress=not args.quiet, emit=lambda line: print(line, file=sys.stderr))
            print(f"{name}: {format_manifest_summary(report.manifest)}", file=sys.stderr)

    extra = serve_overrides(
        port=args.port,
        cores=args.cores,
        copies=args.copies,
        name=args.name,
        artifacts=args.artifacts,
        mode=args.mode,
    )
    return run(args.config, [*args.overrides, *extra])


def cmd_deploy(args: argparse.Namespace) -> int:
    from neuronserve.deploy.commands import deploy

    if args.neuron_ls is not None and not args.dry_run:
        raise ConfigError("--neuron-ls plans for another host: use it with --dry-run")
    if args.host_memory_gib is not None and args.host_memory_gib <= 0:
        raise ConfigError("--host-memory-gib must be above 0, e.g. --host-memory-gib 64")
    host_memory = None if args.host_memory_gib is None else int(args.host_memory_gib * (1 << 30))
    overrides = [*args.overrides, *([f"deploy.launcher={args.launcher}"] if args.launcher else [])]
    settings = load_settings(args.config, overrides=overrides)
    if settings.deploy.launcher == "k8s":
        from neuronserve.deploy.commands import emit_k8s

        if not args.emit:
            raise ConfigError(
                "the k8s launcher writes a Kustomize base: pass --emit DIR (then kubectl apply -k DIR; "
                "nothing here talks to a cluster)"
            )
        return emit_k8s(settings, Path(args.emit))
    if args.emit:
        raise ConfigError("--emit writes a Kubernetes base: use it with --launcher k8s")
    if settings.model.task.generates:
        from neuronserve.generate.launch import deploy as deploy_generation

        if args.emit_compose:
            raise ConfigError(
                "--emit-compose is for encoders; text-generation models deploy with --launcher docker or local"
            )
        return deploy_generation(
            settings,
            dry_run=args.dry_run,
            neuron_ls=Path(args.neuron_ls) if args.neuron_ls else None,
            host_memory=host_memory,
        )
    return deploy(
        settings,
        args.config,
        dry_run=args.dry_run,
        emit_compose=args.emit_compose,
        neuron_ls=Path(args.neuron_ls) if args.neuron_ls else None,
        host_memory=host_memory,
    )


def cmd_k8s_check(args: argparse.Namespace) -> int:
    from neuronserve.deploy.k8s_check import check

    report = check(Path(args.directory), kubernetes_version=args.kubernetes_version, checkov=args.checkov)
    print(report.text())
    return 0 if report.ok else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from neuronserve.tune.run import TuneOptions, tune

    if not math.isfinite(args.time_budget) or args.time_budget < 60:
        raise ConfigError("--time-budget must be at least 60 seconds (tracing and one trial need that)")
    if args.max_sequence_lengths < 0 or args.max_batch_sizes < 0:
        raise ConfigError("--max-sequence-lengths and --max-batch-sizes must be 0 (default) or more")
    options = TuneOptions(
        config=args.config,
        overrides=tuple(args.overrides),
        dataset=args.dataset,
        time_budget_s=args.time_budget,
        max_sequence_lengths=args.max_sequence_lengths,
        max_batch_sizes=args.max_batch_sizes,
    )
    if _settings(args).model.task.generates:
        from neuronserve.tune.generative import tune_generative

        try:
            seqs = tuple(int(x) for x in args.max_num_seqs.split(",") if x.strip())
        except ValueError:
            raise ConfigError("--max-num-seqs takes numbers, e.g. --max-num-seqs 4,8,16") from None
        if any(n < 1 for n in seqs):
            raise ConfigError("--max-num-seqs takes numbers of 1 or more, e.g. --max-num-seqs 4,8,16")
        if args.dataset:  # as typed, from here (bench.dataset in a config: from the config's directory)
            dataset = Path(args.dataset).resolve()
            options = dataclasses.replace(options, overrides=(*options.overrides, f"bench.dataset={dataset}"))
        return tune_generative(options, emit=lambda line: print(line, flush=True), max_num_seqs=seqs)
    if args.max_num_seqs:
        raise ConfigError("--max-num-seqs is for text-generation models (model.task=text-generation)")
    return tune(options, emit=lambda line: print(line, flush=True))


def cmd_status(args: argparse.Namespace) -> int:
    from neuronserve.deploy.commands import status

    return status(_settings(args))


def cmd_cleanup(args: argparse.Namespace) -> int:
    from neuronserve.deploy.commands import cleanup

    return cleanup(_settings(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from neuronserve.loadgen.cli import run_parsed

    return run_parsed(args)


def cmd_monitor(args: argparse.Namespace) -> int:
    from neuronserve.artifacts import artifacts_directory
    from neuronserve.backends import CoreSet, choose_backend, parse_kind
    from neuronserve.monitor.host import Servers, no_servers
    from neuronserve.monitor.run import resolve_sources, serve

    settings = _settings(args)
    if args.backend is not None:
        backend = parse_kind(args.backend)
    else:
        from neuronserve.artifacts import read_manifest

        kind, _ = choose_backend(settings.trace.backend)
        backend = read_manifest(artifacts_directory(settings, kind)).backend
    cpus = list(CoreSet.parse(args.cpus).ids) if args.cpus else None
    servers: Servers = no_servers
    if args.run_dir:  # a local deployment's exporter (the deploy extra is there; in a container it is not)
        from neuronserve.deploy.local import deployment_servers

        servers = partial(deployment_servers, Path(args.run_dir))
    return serve(settings, resolve_sources(settings, backend), cpus=cpus, servers=servers)


def cmd_dashboards(args: argparse.Namespace) -> int:
    from neuronserve.monitor import dashboards
    from neuronserve.monitor.prometheus import render_prometheus_yml

    root = Path(args.output)
    for path in dashboards.write(root / "grafana" / "dashboards"):
        print(f"wrote {path}")
    (root / "prometheus").mkdir(parents=True, exist_ok=True)
    (root / "prometheus" / "prometheus.yml").write_text(render_prometheus_yml(5.0))
    print(f"wrote {root / 'prometheus' / 'prometheus.yml'}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from neuronserve.deploy.local import run_dir
    from neuronserve.monitor.top import run as run_top

    settings = _settings(args)
    m = settings.monitor
    exporter = f"http://{m.host}:{m.port}/metrics" if m.enabled else None
    key = settings.api_key() if settings.serve.metrics_need_key else ""
    return run_top(run_dir(settings).path, exporter, args.interval, args.once, api_key=key)


def cmd_manifest(args: argparse.Namespace) -> int:
    from neuronserve.artifacts import load_manifest

    manifest = load_manifest(Path(args.directory), backend=args.backend)
    print(format_manifest_summary(manifest))
    print("checksums: all files verified")
    return 0


def cmd_acceptance(args: argparse.Namespace) -> int:
    import datetime as dt

    from neuronserve.acceptance import run

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return run(
        backend=args.backend,
        model=args.model,
        instance_type=args.instance_type,
        concurrency=args.concurrency,
        duration_s=args.duration,
        output=Path(args.output or f"results/acceptance-{stamp}"),
        settings=args.overrides,
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    from neuronserve.doctor import FAIL, check_host, report

    checks = check_host(_settings(args))
    print(report(checks))
    return EXIT_FAILURE if any(c.status == FAIL for c in checks) else 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.template:
        sys.stdout.write(render_template())
        return 0
    if args.reference:
        sys.stdout.write(render_reference())
        return 0
    import json

    settings = _settings(args)
    print(json.dumps(settings.as_dict(redact=True), indent=2))
    return 0


def format_manifest_summary(manifest: object) -> str:
    """A human summary of a manifest: model, backend, versions and one row per shape."""
    from neuronserve.artifacts import Manifest

    assert isinstance(manifest, Manifest), "this is a bug: expected a Manifest"
    m = manifest
    lines = [
        f"model:     {m.model['name']} ({m.task}) from {m.model['source']}",
        f"sha256:    {m.model['sha256'][:16]}...",
        f"backend:   {m.backend}   versions: "
        + ", ".join(f"{k} {v}" for k, v in m.versions.items() if k != "python"),
        f"inputs:    {', '.join(m.input_names)}   outputs: {', '.join(m.output_names)}",
        f"directory: {m.directory}",
        f"{'shape':<12}{'file':<22}{'ms/call':>9}  {'max abs diff':>12}  {'min cosine':>10}",
    ]
    for s in m.shapes:
        lines.append(
            f"{f'b{s.batch_size} s{s.sequence_length}':<12}{s.file:<22}{s.cost_s * 1000:>9.1f}  "
            f"{s.verification['max_abs_diff']:>12.2e}  {s.verification['min_cosine']:>10.6f}"
        )
    sizes = m.memory.artifact_bytes
    lines.append(
        f"artifacts: {len(sizes)} file(s), {sum(sizes.values()) / 1e6:.1f} MB for {len(m.shapes)} shapes; "
        f"weights {m.memory.weight_bytes / 1e6:.1f} MB"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one declaration per command
    parser = argparse.ArgumentParser(prog="neuronserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"neuronserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trace", help="compile the model at every configured shape and verify it")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="recompile shapes that are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--runner",
        choices=("auto", "local", "docker"),
        default="local",
        help="auto: in the trace image when a Docker engine is reachable, else locally",
    )
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser(
        "image",
        help="build a container image: trace, serve (what deploy.launcher=docker runs), engine "
        "(a text-generation model's on cpu) or nginx (deploy.docker_nginx_image, without a registry); "
        "FROM deploy.docker_base_image when set",
    )
    p.add_argument("action", choices=("build",))
    p.add_argument("stage", nargs="?", choices=STAGES, help="default: trace")
    p.add_argument("--stage", dest="stage_option", choices=STAGES, default="trace")
    _add_config_args(p)
    p.set_defaults(func=cmd_image_build)

    p = sub.add_parser("serve", help="run one model server (gunicorn + one uvicorn worker, or uvicorn)")
    _add_config_args(p)
    p.add_argument("--port", type=int, help="serve.port")
    p.add_argument("--cores", help="serve.cores, NEURON_RT_VISIBLE_CORES syntax (e.g. 0-1)")
    p.add_argument("--copies", type=int, help="serve.models_per_server")
    p.add_argument("--name", help="serve.name (the x-server header)")
    p.add_argument("--artifacts", help="serve.artifacts (an artifact directory)")
    p.add_argument("--mode", choices=("gunicorn", "uvicorn"), help="serve.mode")
    p.add_argument(
        "--model",
        metavar="ID_OR_DIR",
        help="model.source (a hub id, a directory or bundled:NAME): traced first when its artifacts are "
        "missing or stale (cached), then served",
    )
    p.add_argument("--task", help="model.task (default feature-extraction)")
    p.add_argument("--revision", help="model.revision of a hub id (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="model.trust_remote_code=true")
    p.add_argument("--host", help="serve.host (default 127.0.0.1; 0.0.0.0 to be reached from other hosts)")
    p.add_argument(
        "--api-key-file",
        dest="api_key_file",
        help="serve.api_key_file: a file holding the key requests must send (Authorization: Bearer KEY)",
    )
    p.add_argument(
        "--api-key",
        dest="api_key",
        help="serve.api_key (visible to local users in the process list: prefer --api-key-file)",
    )
    p.add_argument("--quiet", action="store_true", help="no trace progress bars")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="start every server of the plan behind nginx and wait until ready")
    _add_config_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and its memory estimate, refuse what does not fit, stop",
    )
    p.add_argument("--emit-compose", metavar="FILE", help="write the deployment as a compose file and stop")
    p.add_argument(
        "--neuron-ls",
        metavar="FILE",
        help="with --dry-run: plan for the host whose `neuron-ls -j` output this is (cores, device memory)",
    )
    p.add_argument(
        "--host-memory-gib",
        type=float,
        metavar="GIB",
        help="host memory to plan with (default: MemAvailable of this host, capped by its cgroup)",
    )
    p.add_argument("--launcher", choices=("local", "docker", "k8s"), help="deploy.launcher for this run")
    p.add_argument(
        "--emit",
        metavar="DIR",
        help="k8s: write the Kustomize base into DIR (kubectl apply -k DIR deploys it)",
    )
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("k8s", help="Kubernetes: validate an emitted Kustomize base offline")
    k8s_sub = p.add_subparsers(dest="k8s_command", required=True)
    c = k8s_sub.add_parser(
        "check", help="render with kubectl kustomize, validate every object strictly, run checkov"
    )
    c.add_argument("directory", help="the base (or an overlay) to check")
    c.add_argument("--kubernetes-version", default="1.32", help="the schemas to validate against")
    c.add_argument("--checkov", help="the checkov executable (default: on PATH, else .venv-tools)")
    c.set_defaults(func=cmd_k8s_check)

    p = sub.add_parser("status", help="state, readiness, cores, port and restarts of each server")
    _add_config_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cleanup", help="stop the deployment and remove exactly what it made")
    _add_config_args(p)
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser(
        "tune",
        help="choose shapes from traffic and search deployments for the best throughput within budgets",
        description="Trace the grid the traffic needs, deploy candidate layouts one at a time on free "
        "ports, load each within bench.latency_budget_ms / bench.error_budget / bench.cost_budget, and "
        "write results/tune-<stamp>/ (report.md, pareto.png, tuned.properties). Ctrl-C stops cleanly "
        "and writes the report so far. A text-generation model: copies x cores per copy (its "
        "tensor-parallel degree) x --max-num-seqs, each loaded with streamed requests (bench.* as "
        "neuronserve bench --api reads them) within bench.ttft_budget_ms / bench.tpot_budget_ms / "
        "bench.error_budget.",
    )
    _add_config_args(p)
    p.add_argument(
        "--dataset",
        metavar="FILE",
        default="",
        help="traffic sample, as run_apis.py reads it (.jsonl field bench.text_field, .csv column, or one "
        "text per line); default: bench.dataset, else the built-in texts",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="wall-clock budget of the whole tune, tracing included (default 900)",
    )
    p.add_argument(
        "--max-sequence-lengths",
        type=int,
        default=0,
        metavar="N",
        help="shape budget: sequence lengths to compile (default: as many as the configured grid has)",
    )
    p.add_argument(
        "--max-batch-sizes",
        type=int,
        default=0,
        metavar="N",
        help="shape budget: batch sizes to compile (default: as many as the configured grid has)",
    )
    p.add_argument(
        "--max-num-seqs",
        default="",
        metavar="N,N",
        help="text-generation: the engine batches (generate.max_num_seqs) to try with each layout "
        "(default: the configured one)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "bench",
        help="the load client (the same options as run_apis.py)",
        description=bench_options.DESCRIPTION,
    )
    bench_options.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "monitor", help="the Prometheus exporter (neuron-monitor, host, replay or stdin sources)"
    )
    _add_config_args(p)
    p.add_argument(
        "--backend",
        choices=("cpu", "neuronx", "neuron"),
        help="for monitor.sources=auto (default: the artifacts')",
    )
    p.add_argument("--cpus", help="CPUs whose utilization the host source reports (default: all)")
    p.add_argument("--run-dir", help="a local deployment's run directory, for per-server CPU and memory")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("dashboards", help="generate the Grafana dashboards and prometheus.yml")
    p.add_argument("--output", default="monitor", help="the monitor/ directory")
    p.set_defaults(func=cmd_dashboards)

    p = sub.add_parser(
        "top", help="a live view of the deployment: per-server rate, latency, queue; per-core use"
    )
    _add_config_args(p)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("manifest", help="verify an artifact directory and summarise its manifest")
    p.add_argument("directory", help="e.g. trace-models/all-MiniLM-L6-v2/cpu")
    p.add_argument("--backend", help="also require artifacts of this backend")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser(
        "doctor", help="check this host first: devices, driver, SDK and torch, cores, nginx, artifacts"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "acceptance", help="prove this host end to end: doctor, trace, deploy, load, report vs AWS's figure"
    )
    p.add_argument("--backend", default="auto", help="trace.backend (auto, neuronx, neuron, cpu)")
    p.add_argument("--model", default="bert-base-uncased", help="model.source (default bert-base-uncased)")
    p.add_argument("--instance-type", default="inf2.xlarge", help="for the published figure and costs")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="closed-loop levels")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--output", help="report directory (default results/acceptance-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_acceptance)

    p = sub.add_parser("config", help="print the effective settings (secrets redacted)")
    _add_config_args(p)
    p.add_argument("--template", action="store_true", help="print the documented default config.properties")
    p.add_argument(
        "--reference", action="store_true", help="print docs/configuration.md's table of every key"
    )
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll is noise
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"neuronserve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        from neuronserve.extras import missing_extra

        message = missing_extra(exc, args.command)
        if message is None:
            raise
        print(f"neuronserve {message}", file=sys.stderr)
        return EXIT_FAILURE
    except _user_errors() as exc:
        print(f"neuronserve: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
