"""The nginx configuration in front of a deployment's servers.

``least_conn`` spreads requests by open requests per server (kernel accept order piled
keep-alive connections onto one worker in measured runs). Each server takes at most
``max_conns`` requests at once, so overload never floods a server's event loop: the excess is
answered by nginx itself (503 with Retry-After, our JSON error shape), never by a reset; every
other answer nginx gives itself (413, 400, 414, ...) is in that shape too. A
failed attempt, POSTs included (inference has no side effects), and a 503 from a draining or
unhealthy server are retried, up to twice, until another server takes them; a timeout never is
(under overload a retry only doubles the work).

With two servers or more (not LLM engine copies), each server is listed twice: first for one
request at a time, the first server with the most weight, then as a backup for the rest. An
idle endpoint so sends a lone client's requests to one server, whose threads and caches stay
warm (plain ``least_conn`` alternates idle servers, and each request then finds its server's
caches cold from the other's), the next request in flight to the next idle server, and the rest
by ``least_conn`` among the backups: the split under load is as even as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from neuronserve.config import ConfigError, Settings


def server_access_log(settings: Settings) -> str:
    """serve.access_log for servers behind nginx: nginx already logs each request (id, status,
    timings), so ``auto`` turns the servers' own line off (it costs each request CPU)."""
    return "off" if settings.serve.access_log == "auto" else settings.serve.access_log


# nginx's own answers, in the servers' error shape: (status nginx met, status answered, type,
# message, extra header). Served from internal URIs under /.neuronserve/.
_OWN_ERRORS = (
    ((502, 504), 503, "unavailable", "no server could take the request (all busy or down); retry shortly",
     "Retry-After 1"),
    ((400,), 400, "invalid_request", "malformed HTTP request (request line or headers)", ""),
    ((408,), 408, "invalid_request", "the request was not sent in time; send it again", ""),
    ((413,), 413, "payload_too_large", "body: more than {limit} bytes exceed serve.max_body_bytes ({limit} bytes); "
     "send fewer or shorter inputs per request", ""),
    ((414,), 414, "invalid_request", "the request line is too long; send inputs in the body", ""),
    ((494,), 431, "invalid_request", "the request headers are too large", ""),
    ((500,), 500, "internal_error", "internal error in the endpoint; see its error log", ""),
)  # fmt: skip


def _own_errors(max_body_bytes: int) -> tuple[str, str]:
    """(the error_page lines, the internal locations) of :data:`_OWN_ERRORS`."""
    pages, locations = [], []
    for met, answered, kind, message, header in _OWN_ERRORS:
        uri = f"/.neuronserve/{answered}"
        change = f"={answered} " if answered not in met else ""
        pages.append(f"        error_page {' '.join(map(str, met))} {change}{uri};")
        body = {"error": message.format(limit=max_body_bytes), "type": kind}
        if kind == "payload_too_large":
            body["field"] = "body"
        lines = [
            f"        location = {uri} {{",
            "            internal;",
            "            default_type application/json;",
        ]
        if header:
            lines.append(f"            add_header {header} always;")
        lines += [f"            return {answered} '{json.dumps(body, separators=(',', ':'))}';", "        }"]
        locations.append("\n".join(lines) + "\n")
    return "\n".join(pages), "\n".join(locations)


def check_api_key(key: str) -> None:
    """An API key nginx can compare as it is: printable, no quotes, backslashes, spaces or $."""
    if any(c in key for c in "\"'\\ ;{}$") or not key.isprintable():
        raise ConfigError(
            "serve.api_key: nginx checks the key of an engine deployment, and it may not contain quotes, "
            "backslashes, spaces, ;, {, } or $ (e.g. use openssl rand -hex 32)"
        )


def render_nginx_conf(
    *,
    listen_host: str,
    listen_port: int,
    upstreams: Sequence[str],
    run_dir: Path | None,
    max_body_bytes: int,
    read_timeout_s: float,
    max_conns: int = 128,
    user: str | None = None,
    streams: bool = False,
    api_key: str = "",
    metrics_listen: str = "",
    metrics_key: bool = False,
) -> str:
    """``upstreams`` are ``host:port``; ``run_dir`` holds pid, temp files and logs (None: stdout,
    for containers).

    ``streams`` (LLM engine copies): answers pass through as they come (server-sent events, no
    buffering) and a request goes to another copy only while nothing of its answer was sent
    (nginx never retries after that, so a stream cut by a dying copy ends with an error the
    client sees, never a silent restart). ``api_key``: checked here, at the edge (the engines
    have no key of their own; they listen on loopback only). ``metrics_listen`` (``host:port``):
    a second listener that answers only ``/metrics``, from the upstream (a pod's engine, which
    Prometheus cannot reach on its loopback), behind ``api_key`` too with ``metrics_key``."""
    if not upstreams:
        raise ValueError("this is a bug: nginx needs at least one upstream")
    servers, tries = _upstream_servers(
        upstreams, max_conns, first_idle=not streams and len(upstreams) > 1 and max_conns > 1
    )
    if run_dir is not None:
        files = (
            f"pid {run_dir}/nginx/nginx.pid;\nerror_log {run_dir}/logs/nginx-error.log warn;\n",
            f"    access_log {run_dir}/logs/nginx-access.log neuronserve;\n"
            + "".join(
                f"    {kind}_temp_path {run_dir}/nginx/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
        )
    else:
        files = ("pid /tmp/nginx.pid;\nerror_log stderr warn;\n", "    access_log /dev/stdout neuronserve;\n")
    user_line = f"user {user};\n" if user else ""
    stream_lines = "            proxy_buffering off;\n            proxy_cache off;\n" if streams else ""
    key_check = ""
    # An engine's /health is the probe of the endpoint: no key (it tells nothing but up or down).
    open_health = (
        "        location = /health {\n            proxy_pass http://neuronserve_servers;\n"
        '            proxy_http_version 1.1;\n            proxy_set_header Connection "";\n        }\n\n'
        if streams
        else ""
    )
    if api_key:
        check_api_key(api_key)
        unauthorized = json.dumps(
            {"error": "missing or wrong API key: send Authorization: Bearer <key>", "type": "unauthorized"},
            separators=(",", ":"),
        )
        # A plain comparison: case-sensitive, and no hash table to outgrow with a long key.
        key_check = (
            f'            if ($http_authorization != "Bearer {api_key}") {{\n'
            "                add_header WWW-Authenticate Bearer always;\n"
            f"                return 401 '{unauthorized}';\n"
            "            }\n            default_type application/json;\n"
        )
    # A stream a copy had begun is never sent again (a request that killed one copy must not kill
    # the next): only attempts that never reached a copy are retried.
    retry = "error http_502 http_503" if streams else "error http_502 http_503 non_idempotent"
    error_pages, error_locations = _own_errors(max_body_bytes)
    return f"""# Generated by neuronserve deploy; edits are overwritten on the next deploy.
{user_line}worker_processes 1;
worker_rlimit_nofile 65536;
{files[0]}
events {{
    # Each proxied request holds two: the client's and the server's.
    worker_connections 16384;
}}

http {{
    # Request ids: the client's x-request-id when it sends one, else nginx's own.
    map $http_x_request_id $neuronserve_request_id {{
        default $http_x_request_id;
        ""      $request_id;
    }}
    log_format neuronserve escape=json '{{"ts":"$time_iso8601","request_id":"$neuronserve_request_id",'
        '"method":"$request_method","uri":"$uri","status":$status,"bytes":$body_bytes_sent,'
        '"request_time":$request_time,"upstream":"$upstream_addr","upstream_status":"$upstream_status",'
        '"upstream_time":"$upstream_response_time"}}';
{files[1]}
    client_max_body_size {max_body_bytes};
    client_body_buffer_size 1m;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    server_tokens off;

    upstream neuronserve_servers {{
        least_conn;
{servers}
        keepalive 64;
        keepalive_requests 100000;
        keepalive_timeout 60s;
    }}

    server {{
        listen {listen_host}:{listen_port} backlog=4096;

        # nginx's own answers in the servers' JSON error shape (a server's own errors pass
        # through as they are): set here, once, for every location (a location that set any
        # error_page of its own would inherit none of these). Internal URIs, not named
        # locations: a request whose line could not be read has no URI to carry to a name.
{error_pages}

        location / {{
{key_check}{stream_lines}            proxy_pass http://neuronserve_servers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Request-ID $neuronserve_request_id;
            proxy_next_upstream {retry};
            proxy_next_upstream_tries {tries};
            proxy_connect_timeout 2s;
            proxy_send_timeout {int(read_timeout_s)}s;
            proxy_read_timeout {int(read_timeout_s)}s;
            proxy_intercept_errors off;
        }}

{open_health}        # Prometheus scrapes each server on loopback; the public endpoint does not expose
        # metrics (traffic volumes and timings are nobody else's business).
        location = /metrics {{
            default_type application/json;
            return 404 '{{"error":"metrics are scraped from each server, not through the endpoint","type":"not_found"}}';
        }}

{error_locations}    }}
{_metrics_server(metrics_listen, key_check if metrics_key else "")}}}
"""


# nginx breaks ties between idle servers' one-request entries by weighted round robin: the first
# server's entry weighs this much per other server, so it takes 100 of every 101 ties.
FIRST_WEIGHT = 100


def _upstream_servers(upstreams: Sequence[str], max_conns: int, *, first_idle: bool) -> tuple[str, int]:
    """The upstream block's server lines and the attempts a request may make (see the module
    docstring). A failed attempt marks only the entry it used as failed, so with each server
    listed twice a request may meet a dead server twice before a live one: three attempts (so a
    request that crashes a server may be tried on it twice, then on another; before, once on
    each of two)."""
    if not first_idle:
        lines = [f"server {u} max_fails=1 fail_timeout=2s max_conns={max_conns};" for u in upstreams]
        return "\n".join(f"        {line}" for line in lines), 2
    first = FIRST_WEIGHT * (len(upstreams) - 1)
    one = [
        f"server {u}{f' weight={first}' if i == 0 else ''} max_fails=1 fail_timeout=2s max_conns=1;"
        for i, u in enumerate(upstreams)
    ]
    rest = [f"server {u} backup max_fails=1 fail_timeout=2s max_conns={max_conns - 1};" for u in upstreams]
    return "\n".join(f"        {line}" for line in one + rest), 3


def _metrics_server(listen: str, key_check: str) -> str:
    if not listen:
        return ""
    return f"""
    server {{
        listen {listen};
        location = /metrics {{
{key_check}            proxy_pass http://neuronserve_servers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error":"this port serves /metrics only","type":"not_found"}}';
        }}
    }}
"""
