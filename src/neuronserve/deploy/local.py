"""The local launcher: supervisord runs each server and nginx; everything lives in one run dir.

``run/<deployment>/`` holds ``plan.json``, ``supervisord.conf``, ``nginx.conf``, the supervisor
socket and pid, and ``logs/<program>.log``. Cleanup stops exactly that supervisord (and so its
programs) and removes exactly that directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from neuronserve.config import Settings, section_environment, settings_environment
from neuronserve.deploy.nginx import render_nginx_conf, server_access_log
from neuronserve.deploy.plan import Plan, ServerPlan

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """A deployment cannot start or be found; the message says why and what to do."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def conf(self) -> Path:
        return self.path / "supervisord.conf"

    @property
    def socket(self) -> Path:
        """supervisord's unix socket: in the run directory, unless its path would be too long
        for a unix socket (a checkout deep in the file system); then in a private directory
        under the temp dir, named by the run directory so every command finds the same one."""
        own = self.path / "supervisor.sock"
        if len(os.fsencode(own)) <= SOCKET_PATH_MAX:
            return own
        digest = hashlib.sha256(os.fsencode(self.path)).hexdigest()[:16]
        return private_socket_directory() / f"{digest}.sock"

    @property
    def pidfile(self) -> Path:
        return self.path / "supervisord.pid"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    def log(self, program: str) -> Path:
        return self.path / "logs" / f"{program}.log"


# A unix socket's path has room for 107 bytes (sun_path); keep well under it.
SOCKET_PATH_MAX = 100


def private_socket_directory() -> Path:
    return Path(tempfile.gettempdir()) / f"neuronserve-{os.getuid()}"


def _make_private_socket_directory() -> None:
    """The temp dir is shared: the directory must be ours and closed to everyone else."""
    directory = private_socket_directory()
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise DeployError(
            f"{directory} (for supervisord's socket, the run directory's path being too long) must be "
            "a directory of this user's with mode 0700; remove it, or set deploy.run_dir to a shorter path"
        )


def run_dir(settings: Settings) -> RunDir:
    return RunDir(settings.path(settings.deploy.run_dir) / settings.deploy.name)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def supervisord_pid(rd: RunDir) -> int | None:
    """The pid of this deployment's supervisord if it is alive."""
    try:
        pid = int(rd.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


RUN_DIR_MARKER = "NEURONSERVE_RUN_DIR"


def server_environment(
    settings: Settings, server: ServerPlan, artifacts: Path, config: Path | None, plan: Plan
) -> dict[str, str]:
    """What a server process needs: its settings as NEURONSERVE_* variables (settings, not objects).

    The deploy's effective ``serve.*`` and ``trace.*`` settings (from the file, the environment
    and ``--set``) go to every server, then what the plan decides for this server.
    """
    env = {
        # with further models' artifacts and fingerprints (deploy set them to what it verified)
        **settings_environment(settings, "serve", "trace"),
        "NEURONSERVE_SERVE__HOST": "127.0.0.1",
        "NEURONSERVE_SERVE__PORT": str(server.port),
        "NEURONSERVE_SERVE__CORES": str(server.cores),
        "NEURONSERVE_SERVE__NAME": f"{settings.deploy.name}-{server.name}",
        "NEURONSERVE_SERVE__MODELS_PER_SERVER": str(server.copies),
        "NEURONSERVE_SERVE__ARTIFACTS": str(artifacts),
        "NEURONSERVE_SERVE__MODE": "gunicorn",
        "NEURONSERVE_SERVE__ACCESS_LOG": server_access_log(settings),
        "HF_HUB_OFFLINE": "1",
        # Marks every process of this deployment, so cleanup finds them whatever died before.
        RUN_DIR_MARKER: str(run_dir(settings).path.resolve()),
    }
    if config is not None:
        env["NEURONSERVE_CONFIG"] = str(config)
    if plan.shared_cores is not None:
        env["NEURONSERVE_SERVE__SHARED_CORES"] = str(plan.shared_cores)
        env["NEURONSERVE_SERVE__CORE_LEDGER"] = str(core_ledger(settings))
        # torch's OpenMP threads (TorchScript) sleep when a call ends instead of spinning on the
        # CPUs: those are lent to the next call, often another server's.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def core_ledger(settings: Settings) -> Path:
    """The deployment's host-wide core ledger (see serving.hostcores): a file its servers lock
    bytes of; the kernel drops a dead server's locks."""
    return run_dir(settings).path.resolve() / "cores.ledger"


def all_cores(plan: Plan) -> str:
    from neuronserve.backends.base import CoreSet

    return str(CoreSet(tuple(sorted({c for s in plan.servers for c in s.cores.ids}))))


def _supervisor_env(env: dict[str, str]) -> str:
    """``environment=`` for supervisord: each value quoted so commas survive, ``%`` doubled for
    its ini interpolation. supervisord has no escape for a quote inside a quoted value."""
    from neuronserve.config import ConfigError

    pairs = []
    for key, value in sorted(env.items()):
        if ('"' in value and "'" in value) or "\n" in value:
            name = key.removeprefix("NEURONSERVE_").lower().replace("__", ".")
            raise ConfigError(
                f"{name} contains both ' and \" (or a newline), which supervisord cannot pass to "
                "a server; choose a value without one of them"
            )
        quote = "'" if '"' in value else '"'
        pairs.append(f"{key}={quote}{value.replace('%', '%%')}{quote}")
    return ",".join(pairs)


@dataclass(frozen=True)
class EngineProgram:
    """A server process that is not neuronserve's own (an LLM engine copy): its command line
    (the copy's keeper, which stops the engine's whole process group with it) and environment."""

    name: str
    command: str
    env: dict[str, str]
    port: int
    cores: str
    autostart: bool = True  # off: the launcher starts it later (Supervisor.start_program)


def render_supervisord_conf(
    *,
    settings: Settings,
    plan: Plan,
    rd: RunDir,
    artifacts: Path,
    config: Path | None,
    nginx: str,
    python: str,
    passthrough_env: dict[str, str],
    engines: Sequence[EngineProgram] = (),
) -> str:
    """One program per server (or per engine copy) plus nginx; restarts on crash; stops with
    SIGTERM (servers drain)."""
    stop_wait = int(settings.serve.drain_timeout_s) + 15
    lines = [
        "; Generated by neuronserve deploy; edits are overwritten on the next deploy.",
        "[unix_http_server]",
        f"file={rd.socket}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={rd.log('supervisord')}",
        f"pidfile={rd.pidfile}",
        f"directory={settings.base_dir}",
        "logfile_maxbytes=10MB",
        "logfile_backups=2",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{rd.socket}",
    ]
    marker = {RUN_DIR_MARKER: str(rd.path.resolve())}
    for engine in engines:
        lines += [
            "",
            f"[program:{engine.name}]",
            f"command={engine.command.replace('%', '%%')}",
            f"environment={_supervisor_env({**passthrough_env, **engine.env, **marker})}",
            f"autostart={'true' if engine.autostart else 'false'}",
            "autorestart=true",
            "startsecs=5",
            "startretries=10",
            "stopsignal=TERM",
            "stopwaitsecs=30",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={rd.log(engine.name)}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
        ]
    for server in () if engines else plan.servers:
        env = {**passthrough_env, **server_environment(settings, server, artifacts, config, plan)}
        lines += [
            "",
            f"[program:{server.name}]",
            f"command={python} -m neuronserve.cli serve",
            f"environment={_supervisor_env(env)}",
            "autostart=true",
            "autorestart=true",
            "startsecs=2",
            "startretries=20",
            "stopsignal=TERM",
            f"stopwaitsecs={stop_wait}",
            # TERM to gunicorn only (it forwards to its worker, which drains); KILL to the group.
            "stopasgroup=false",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={rd.log(server.name)}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
        ]
    if settings.monitor.enabled:
        lines += [
            "",
            "[program:exporter]",
            f"command={python} -m neuronserve.cli monitor --backend {plan.backend} --cpus {all_cores(plan)} --run-dir {rd.path}",
            f"environment={_supervisor_env({**passthrough_env, **marker, **section_environment(settings, 'monitor')})}",
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "stopsignal=TERM",
            "stopwaitsecs=10",
            "redirect_stderr=true",
            f"stdout_logfile={rd.log('exporter')}",
        ]
    if settings.monitor.prometheus:
        prom = rd.path / "prometheus"
        lines += [
            "",
            "[program:prometheus]",
            f"command={shutil.which('prometheus') or '/usr/bin/prometheus'} --config.file={prom / 'prometheus.yml'} "
            f"--storage.tsdb.path={prom / 'data'} --web.listen-address=127.0.0.1:{settings.monitor.prometheus_port}",
            f"environment={_supervisor_env({**passthrough_env, **marker})}",
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "stopsignal=TERM",
            "stopwaitsecs=30",
            "redirect_stderr=true",
            f"stdout_logfile={rd.log('prometheus')}",
        ]
    lines += [
        "",
        "[program:nginx]",
        f"command={nginx} -c {rd.path / 'nginx.conf'} -p {rd.path / 'nginx'} -g 'daemon off;'",
        "autostart=true",
        "autorestart=true",
        "startsecs=1",
        "stopsignal=QUIT",
        "stopwaitsecs=30",
        "redirect_stderr=true",
        f"stdout_logfile={rd.log('nginx')}",
        "",
    ]
    return "\n".join(lines)


# Below Linux's ephemeral range (32768-60999): the kernel never gives these to an outgoing
# connection, so a port found free stays free for the server that binds it a moment later.
FREE_PORT_RANGE = (20000, 32000)


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (a deployment's base_port needs one per
    server), for deployments that must not collide with anything running (tune, tests)."""
    rng = random.Random()  # noqa: S311 - spreads concurrent searches apart; not a secret
    for _ in range(1000):
        first = rng.randrange(FREE_PORT_RANGE[0], FREE_PORT_RANGE[1] - count)
        if not any(port_in_use(host, first + i) for i in range(count)):
            return first
    raise DeployError(f"no {count} consecutive free ports in {FREE_PORT_RANGE}")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _nginx_user() -> str | None:
    """nginx started as root drops its workers to nobody; they must own the temp directories."""
    return "nobody nogroup" if os.geteuid() == 0 else None


def write_run_dir(
    settings: Settings,
    plan: Plan,
    artifacts: Path,
    config: Path | None,
    engines: Sequence[EngineProgram] = (),
) -> RunDir:
    rd = run_dir(settings)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise DeployError(
            "nginx is not installed: scripts/system-deps.sh nginx (apt-get install nginx-light; "
            "fast-api/deploy.sh does this)"
        )
    if settings.monitor.prometheus and not Path(shutil.which("prometheus") or "/usr/bin/prometheus").exists():
        raise DeployError(
            "monitor.prometheus=true but prometheus is not installed: scripts/system-deps.sh prometheus "
            "(apt-get install prometheus), or set monitor.prometheus=false"
        )
    (rd.path / "logs").mkdir(parents=True, exist_ok=True)
    temp = rd.path / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / kind).mkdir(parents=True, exist_ok=True)
    user = _nginx_user()
    if user:
        import grp
        import pwd

        uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.chown(temp / kind, uid, gid)
    read_timeout_s = (
        settings.generate.request_timeout_s if engines else settings.serve.max_request_timeout_ms / 1000 + 5
    )
    _write_owner_only(  # an engine deployment's holds the API key nginx checks
        rd.path / "nginx.conf",
        render_nginx_conf(
            listen_host=plan.host,
            listen_port=plan.port,
            upstreams=[f"127.0.0.1:{s.port}" for s in plan.servers],
            run_dir=rd.path,
            max_body_bytes=settings.serve.max_body_bytes,
            read_timeout_s=read_timeout_s,
            max_conns=settings.deploy.max_conns_per_server,
            user=user,
            streams=bool(engines),
            api_key=settings.api_key() if engines else "",
        ),
    )
    if engines:  # status and the exporter list the copies from the start
        copies = [{"name": e.name, "cores": e.cores, "port": e.port} for e in engines]
        (rd.path / "copies.json").write_text(json.dumps(copies, indent=2) + "\n")
    passthrough = {
        k: v
        for k, v in os.environ.items()
        if k in {"PATH", "HOME", "LANG", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    }
    conf = render_supervisord_conf(
        settings=settings,
        plan=plan,
        rd=rd,
        artifacts=artifacts,
        config=config,
        nginx=nginx,
        python=sys.executable,
        passthrough_env=passthrough,
        engines=engines,
    )
    _write_owner_only(rd.conf, conf)  # the servers' environment in it carries serve.api_key
    rd.plan.write_text(json.dumps(plan_to_json(plan), indent=2) + "\n")
    _write_prometheus(settings, plan, rd, engines)
    return rd


def _write_owner_only(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner alone (a secret is in it), also over an old file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when an old file was there
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _write_prometheus(
    settings: Settings, plan: Plan, rd: RunDir, engines: Sequence[EngineProgram] = ()
) -> None:
    """File-SD targets for Prometheus (the committed monitor/prometheus/prometheus.yml reads
    them), and this deployment's own prometheus.yml when it runs Prometheus itself. Engine
    copies are labelled ``copy``, servers ``server``."""
    from neuronserve.monitor.prometheus import render_prometheus_yml, write_targets

    m = settings.monitor
    prom = rd.path / "prometheus"
    exporter = f"{m.host}:{m.port}" if m.enabled else None
    if engines:
        copies = {e.name: f"127.0.0.1:{e.port}" for e in engines}
        write_targets(prom, settings.deploy.name, copies, exporter, label="copy")
    else:
        servers = {f"{settings.deploy.name}-{s.name}": f"127.0.0.1:{s.port}" for s in plan.servers}
        write_targets(prom, settings.deploy.name, servers, exporter)
    credentials = None
    key = settings.api_key()
    if settings.serve.metrics_need_key and key:  # the servers' /metrics needs the key: give it to Prometheus
        credentials = prom / "api-key"
        _write_owner_only(credentials, key)
    (prom / "prometheus.yml").write_text(render_prometheus_yml(m.scrape_interval_s, credentials))


def plan_to_json(plan: Plan) -> dict[str, Any]:
    data = asdict(plan)
    for server, original in zip(data["servers"], plan.servers, strict=True):
        server["cores"] = str(original.cores)
    data["shared_cores"] = str(plan.shared_cores) if plan.shared_cores is not None else None
    return data


class Supervisor:
    """XML-RPC to this deployment's supervisord over its unix socket (one connection per call)."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd

    def _call(self, method: str, *args: Any) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.rd.socket}")
        try:
            proxy: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()

    def start_program(self, name: str) -> None:
        """Start a program that does not start with supervisord (autostart off); returns at once."""
        self._call("startProcess", name, False)

    def processes(self) -> list[dict[str, Any]]:
        return list(self._call("getAllProcessInfo"))

    def shutdown(self) -> None:
        self._call("shutdown")


def start(
    settings: Settings,
    plan: Plan,
    artifacts: Path,
    config: Path | None,
    engines: Sequence[EngineProgram] = (),
) -> RunDir:
    """Start supervisord for ``plan``; refuses a second deployment of the same name or busy ports."""
    rd = run_dir(settings)
    pid = supervisord_pid(rd)
    if pid is not None:
        raise DeployError(
            f"deployment {settings.deploy.name!r} is already running (supervisord pid {pid}); "
            "run ./fast-api/cleanup.sh first, or set deploy.name to deploy another"
        )
    stale = reap(rd)  # orphans of a crashed deployment of this name (supervisord gone) hold its ports
    if stale:
        log.warning("stopped %d leftover process(es) of a crashed deployment %r", stale, settings.deploy.name)
    busy = [f"{plan.host}:{plan.port}"] if port_in_use(plan.host, plan.port) else []
    busy += [f"127.0.0.1:{s.port}" for s in plan.servers if port_in_use("127.0.0.1", s.port)]
    m = settings.monitor
    if m.enabled and port_in_use(m.host, m.port):
        busy.append(f"{m.host}:{m.port} (monitor.port)")
    if m.prometheus and port_in_use("127.0.0.1", m.prometheus_port):
        busy.append(f"127.0.0.1:{m.prometheus_port} (monitor.prometheus_port)")
    if busy:
        raise DeployError(
            f"ports in use: {', '.join(busy)}; stop what holds them or change deploy.port / deploy.base_port"
        )
    if rd.path.exists():
        shutil.rmtree(rd.path)  # a stale directory of a stopped deployment
    write_run_dir(settings, plan, artifacts, config, engines)
    if rd.socket.parent != rd.path:
        _make_private_socket_directory()
    started = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(rd.conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if started.returncode != 0:
        said = (started.stderr or started.stdout).strip().splitlines()
        raise DeployError(
            f"supervisord did not start (exit {started.returncode}): {said[0] if said else 'no output'}; "
            f"its config is {rd.conf}"
        )
    return rd


CRASH_LOOP_RESTARTS = 2  # a program restarted this often before the deployment was ready fails it


def wait_ready(
    settings: Settings,
    plan: Plan,
    rd: RunDir,
    *,
    probes: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Poll every server's /ready, then the endpoint's; on failure name the server and show its log.

    ``probes``: program name -> URL for servers that are not neuronserve's (engine copies), the
    endpoint's own under ``nginx``."""
    timeout_s = settings.deploy.ready_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    if probes is None:
        probes = {s.name: f"http://127.0.0.1:{s.port}/ready" for s in plan.servers}
        probes["nginx"] = f"http://{plan.host}:{plan.port}/ready"
    pending = dict(probes)
    with httpx.Client(timeout=2) as client:
        while pending:
            for name, url in list(pending.items()):
                if name == "nginx" and len(pending) > 1:
                    continue  # the endpoint last: it is ready when every server is
                with contextlib.suppress(httpx.HTTPError):
                    response = client.get(url)
                    if response.status_code == 200:
                        del pending[name]
                    elif response.status_code == 503 and '"failed"' in response.text:
                        raise DeployError(_failure(name, rd, response.json().get("error", "")))
            if not pending and not _still_starting(rd, set(probes)):
                return
            servers = set(probes)  # nginx too: one that cannot start (a bad config) fails at once
            crashing = [
                n for n, count in restarts(rd).items() if n in servers and count >= CRASH_LOOP_RESTARTS
            ]
            if crashing:
                raise DeployError(_failure(crashing[0], rd, "keeps exiting while it starts"))
            if time.monotonic() > deadline:
                waiting = ", ".join(sorted(pending))
                first = sorted(pending)[0]
                raise DeployError(
                    _failure(
                        first,
                        rd,
                        f"not ready after {timeout_s:.0f}s (waiting for {waiting})",
                    )
                )
            time.sleep(0.2)  # poll interval between readiness checks


def _still_starting(rd: RunDir, programs: set[str]) -> bool:
    """True while supervisord still counts one of ``programs`` as STARTING (its ``startsecs`` not
    yet passed, though it answers): deploy returns once status would show every one RUNNING."""
    try:
        infos = Supervisor(rd).processes()
    except (OSError, xmlrpc.client.Fault):
        return True
    return any(i.get("name") in programs and i.get("statename") == "STARTING" for i in infos)


def _failure(program: str, rd: RunDir, reason: str) -> str:
    return f"{program}: {reason}\n--- last lines of {rd.log(program)} ---\n{tail(rd.log(program))}"


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def restarts(rd: RunDir) -> dict[str, int]:
    """How often supervisord has (re)started each program, from its log."""
    counts: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in rd.log("supervisord").read_text(errors="replace").splitlines():
            if "spawned: '" in line:
                name = line.split("spawned: '", 1)[1].split("'", 1)[0]
                counts[name] = counts.get(name, 0) + 1
    return {k: v - 1 for k, v in counts.items()}


def worker_restarts(rd: RunDir, program: str) -> int:
    """How often a server's gunicorn master replaced its worker (a worker killed or crashed),
    from the server's log: workers booted beyond one per master start."""
    try:
        text = rd.log(program).read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return max(0, text.count("Booting worker with pid") - text.count("Starting gunicorn"))


def stop(rd: RunDir, timeout_s: float = 120.0) -> bool:
    """Stop this deployment's supervisord (programs drain) and remove its run dir; False if none."""
    pid = supervisord_pid(rd)
    if pid is not None:
        try:
            Supervisor(rd).shutdown()
        except (OSError, xmlrpc.client.Fault):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while supervisord_pid(rd) is not None and time.monotonic() < deadline:
            time.sleep(0.1)  # poll until supervisord has stopped its programs and exited
        if supervisord_pid(rd) is not None:
            os.kill(pid, signal.SIGKILL)
    reaped = reap(rd)  # whatever outlived supervisord (a process killed and orphaned before)
    if rd.socket.parent != rd.path:  # supervisord leaves its socket behind when it is killed
        rd.socket.unlink(missing_ok=True)
    existed = rd.path.exists()
    if existed:
        shutil.rmtree(rd.path)
    return pid is not None or existed or reaped > 0


@contextlib.contextmanager
def deployed(settings: Settings, plan: Plan, artifacts: Path, config: Path | None) -> Iterator[RunDir]:
    """Start, wait ready, yield, stop (for tests and the demo)."""
    rd = start(settings, plan, artifacts, config)
    try:
        wait_ready(settings, plan, rd)
        yield rd
    finally:
        stop(rd)


def deployment_processes(rd: RunDir) -> list[int]:
    """Pids of every process of this deployment: those carrying its run-dir marker in their
    environment (servers and their workers, exporter, Prometheus), its nginx master (from
    its pid file, if that process is an nginx) with its workers, and the process groups of its
    engine copies (recorded by their keepers)."""
    marker = f"{RUN_DIR_MARKER}={rd.path.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ:
            found.append(int(entry.name))
    nginx = _nginx_master(rd)
    if nginx is not None:
        found += [nginx, *children(nginx)]
    # engine copies' process groups (their processes overwrite their environment with a title)
    from neuronserve.generate.keeper import group_members, recorded_groups

    for pgid in recorded_groups(rd.path):
        found += group_members(pgid)
    return sorted(set(found) - {os.getpid()})


def _nginx_master(rd: RunDir) -> int | None:
    try:
        pid = int((rd.path / "nginx" / "nginx.pid").read_text().strip())
        exe = Path(f"/proc/{pid}/exe").resolve().name
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # A pid file can outlive its process and the pid be reused: only an nginx started with
    # this deployment's config is ours.
    ours = exe.startswith("nginx") and str(rd.path.resolve() / "nginx.conf").encode() in cmdline
    return pid if ours else None


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (none when it is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def reap(rd: RunDir, grace_s: float = 10.0) -> int:
    """Stop every process of this deployment still alive (TERM, then KILL after ``grace_s``);
    returns how many there were. Nothing else on the host is touched."""
    pids = deployment_processes(rd)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while deployment_processes(rd) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll until they have exited
    for pid in deployment_processes(rd):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def served_programs(run_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """The programs that serve the local deployment in ``run_dir`` (each with its name, cores and
    port), and whether they are an LLM engine's copies (copies.json) rather than neuronserve's
    servers (plan.json)."""
    copies = run_dir / "copies.json"
    if copies.is_file():
        return list(json.loads(copies.read_text())), True
    return list(json.loads((run_dir / "plan.json").read_text())["servers"]), False


def deployment_servers(run_dir: Path) -> dict[str, int]:
    """Server name -> main pid of the local deployment in ``run_dir`` (from its plan and
    supervisord; empty while there is none): what the host exporter samples."""
    if not (run_dir / "plan.json").is_file():
        return {}
    names = {s["name"] for s in served_programs(run_dir)[0]}
    try:
        processes = Supervisor(RunDir(run_dir)).processes()
    except OSError:
        return {}
    return {p["name"]: int(p["pid"]) for p in processes if p["name"] in names and p.get("pid")}
