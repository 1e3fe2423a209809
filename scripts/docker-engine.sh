#!/usr/bin/env bash
# The tests' own Docker engine: Debian's dockerd on a private socket, with its own data root (the
# image cache, kept between runs) and exec root, never the host's /var/run/docker.sock.
#   scripts/docker-engine.sh start   install docker.io if missing, start dockerd, wait until it
#                                    answers; prints DOCKER_HOST=unix://... on stdout
#   scripts/docker-engine.sh stop    stop it and wait: no dockerd, containerd or shim left, no
#                                    mount left under its roots
#   scripts/docker-engine.sh why     exit 0 when an engine can run here, else say why (stderr)
# NEURONSERVE_DOCKER_ROOT (default /var/lib/neuronserve-docker) holds the images;
# NEURONSERVE_DOCKER_RUN (default /run/neuronserve-docker) the socket, pid file and exec root.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT="${NEURONSERVE_DOCKER_ROOT:-/var/lib/neuronserve-docker}"
RUN_DIR="${NEURONSERVE_DOCKER_RUN:-/run/neuronserve-docker}"
SOCKET="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/dockerd.pid"
LOG="$RUN_DIR/dockerd.log"

ours() { [ -f "$PIDFILE" ] && cat "$PIDFILE" 2>/dev/null; }

why_not() {
  if [ "$(id -u)" -ne 0 ]; then echo "dockerd needs root (run as root, or give DOCKER_HOST an engine of yours)"; return 0; fi
  if [ "$(uname -s)" != Linux ]; then echo "dockerd runs on Linux only"; return 0; fi
  if [ ! -d /sys/fs/cgroup ]; then echo "no cgroup filesystem at /sys/fs/cgroup"; return 0; fi
  # Another engine would share its containerd, docker0 and iptables chains with ours: leave it be.
  for pid in $(pgrep -x dockerd || true); do
    if [ "$pid" != "$(ours)" ]; then echo "another dockerd (pid $pid) runs on this host; the tests start theirs only where none does"; return 0; fi
  done
  if [ -S /run/containerd/containerd.sock ] && pgrep -x containerd >/dev/null && ! pgrep -f "containerd.*$RUN_DIR" >/dev/null; then
    echo "a system containerd runs on this host (dockerd would use it); stop it to run the tests' engine"; return 0
  fi
  return 1
}

# Our dockerd: the pid file's process, if it is a dockerd (a stale file's pid may be anyone's).
running() {
  local pid
  pid=$(ours) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]
}

answers() { DOCKER_HOST="unix://$SOCKET" docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  if reason=$(why_not); then echo "no Docker engine can run here: $reason" >&2; exit 3; fi
  ./scripts/system-deps.sh dockerd >&2
  mkdir -p "$DATA_ROOT" "$RUN_DIR"
  child=""
  if ! running; then
    rm -f "$PIDFILE"
    # setsid: the engine outlives this script, in a session of its own; its log is in $LOG.
    setsid dockerd --data-root "$DATA_ROOT" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" \
      --host "unix://$SOCKET" >"$LOG" 2>&1 </dev/null &
    child=$!
  fi
  for _ in $(seq 1 300); do  # poll until it answers (about a second on a warm host)
    if answers; then echo "DOCKER_HOST=unix://$SOCKET"; return 0; fi
    if [ -n "$child" ] && ! kill -0 "$child" 2>/dev/null; then break; fi  # it died: say so at once
    sleep 0.2
  done
  echo "dockerd did not answer on $SOCKET; its log ($LOG) ends with:" >&2
  tail -n 20 "$LOG" >&2 || true
  stop
  exit 1
}

stop() {
  if running; then
    pid=$(ours)
    # Every container of this private engine goes (a run that died early leaves its own, which
    # would refuse the next run's names), and its unused networks; then the engine. Images stay.
    DOCKER_HOST="unix://$SOCKET" docker ps -aq 2>/dev/null | xargs -r env DOCKER_HOST="unix://$SOCKET" docker rm -f >/dev/null 2>&1 || true
    DOCKER_HOST="unix://$SOCKET" docker network prune -f >/dev/null 2>&1 || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  # What an engine killed hard may leave: its containerd and shims, mounts under its roots.
  pkill -f "containerd.*$RUN_DIR" 2>/dev/null || true
  for _ in $(seq 1 50); do pgrep -f "containerd.*$RUN_DIR" >/dev/null || break; sleep 0.2; done
  pkill -KILL -f "containerd.*$RUN_DIR" 2>/dev/null || true
  awk -v a="$DATA_ROOT" -v b="$RUN_DIR" '$2 == a || $2 == b || index($2, a "/") == 1 || index($2, b "/") == 1 {print $2}' /proc/self/mounts \
    | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -f "$SOCKET"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  why) if reason=$(why_not); then echo "$reason" >&2; exit 1; fi ;;
  *) echo "usage: $0 start|stop|why" >&2; exit 2 ;;
esac
