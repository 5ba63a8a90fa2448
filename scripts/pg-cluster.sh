#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the team-state tests (issue 12).
#
#   pg-cluster.sh start DIR [WATCH_PID]   prints "URL PASSWORD" on stdout
#   pg-cluster.sh stop DIR
#
# The cluster listens on 127.0.0.1 only (no Unix socket), on a free port,
# with password (scram) authentication for the superuser `postgres`, so the
# tests exercise `password_env`. PostgreSQL refuses to run as root; as root
# the cluster runs as the system user `pde-pg` (created when missing) or
# `nobody`, and DIR is handed to it. With WATCH_PID, a detached watcher stops
# the cluster and removes DIR once that process exits (a test binary that
# started its own cluster has no exit hook to do it).
set -euo pipefail
cmd=${1:?usage: pg-cluster.sh start|stop DIR [WATCH_PID]}
dir=${2:?usage: pg-cluster.sh start|stop DIR [WATCH_PID]}
watch=${3:-}
bin=${PDE_PG_BIN:-/usr/local/bin}

pg_user=
if [ "$(id -u)" = 0 ]; then
    if ! id pde-pg >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin pde-pg 2>/dev/null || true
    fi
    if id pde-pg >/dev/null 2>&1; then pg_user=pde-pg; else pg_user=nobody; fi
fi

as_pg() {
    if [ -n "$pg_user" ]; then
        setpriv --reuid="$pg_user" --regid="$(id -g "$pg_user")" --clear-groups -- "$@"
    else
        "$@"
    fi
}

case "$cmd" in
start)
    mkdir -p "$dir"
    [ -n "$pg_user" ] && chown "$pg_user" "$dir"
    # DIR (and its parents) must be traversable by the cluster's user.
    chmod 0755 "$dir"
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$password" >"$dir/pwfile"
    [ -n "$pg_user" ] && chown "$pg_user" "$dir/pwfile"
    chmod 0600 "$dir/pwfile"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 \
        --pwfile="$dir/pwfile" -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$dir/pwfile"
    started=
    for _ in $(seq 1 20); do
        port=$((20000 + RANDOM % 40000))
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
        if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 60 \
            -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories= \
                -c max_connections=400 -c fsync=off -c synchronous_commit=off \
                -c full_page_writes=off" start >/dev/null 2>&1; then
            started=1
            break
        fi
    done
    if [ -z "$started" ]; then
        echo "pg-cluster: PostgreSQL did not start; server log:" >&2
        cat "$dir/data/server.log" >&2 || true
        exit 1
    fi
    if [ -n "$watch" ]; then
        # Detached and silent, so a caller reading our stdout sees EOF now.
        setsid bash -c '
            while kill -0 "$1" 2>/dev/null; do sleep 1; done
            "$0" stop "$2"
        ' "$0" "$watch" "$dir" </dev/null >/dev/null 2>&1 &
    fi
    echo "postgres://postgres@127.0.0.1:$port/postgres $password"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: pg-cluster.sh start|stop DIR [WATCH_PID]" >&2
    exit 2
    ;;
esac
