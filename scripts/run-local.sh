#!/usr/bin/env bash
# One-command local stack, the pod layout as local processes:
#   HAProxy :8080 (stats + Prometheus :8404) -> Unix sockets -> N gateway processes,
#   Redis (AOF), PostgreSQL (initdb into the state dir), one worker.
# Ctrl-C stops everything. Data stays in $STATE_DIR (default .local/) between runs.
#
# Environment: GATEWAYS (2), PORT (8080), STATS_PORT (8404), REDIS_PORT (6390),
# PG_PORT (5440), STATE_DIR (.local), PROFILE (release|debug, default release),
# APPENDFSYNC (always|everysec, default always: see the README's durability table),
# AUTH_MODE/JWT_SECRET/API_KEY (passed to the gateways).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEWAYS=${GATEWAYS:-2}
PORT=${PORT:-8080}
STATS_PORT=${STATS_PORT:-8404}
REDIS_PORT=${REDIS_PORT:-6390}
PG_PORT=${PG_PORT:-5440}
STATE_DIR=${STATE_DIR:-$root/.local}
PROFILE=${PROFILE:-release}
APPENDFSYNC=${APPENDFSYNC:-always}
[[ $APPENDFSYNC == always || $APPENDFSYNC == everysec ]] || {
    echo "error: APPENDFSYNC must be always or everysec, not $APPENDFSYNC" >&2
    exit 1
}

need() {
    command -v "$1" > /dev/null || [[ -x /usr/sbin/$1 ]] || {
        echo "error: $1 not found; install it: apt-get install -y $2" >&2
        exit 1
    }
}
need redis-server redis-server
need haproxy haproxy
pg_bin=""
for candidate in /usr/lib/postgresql/*/bin; do [[ -x $candidate/postgres ]] && pg_bin=$candidate; done
[[ -x $pg_bin/postgres ]] || { echo "error: PostgreSQL not found; install it: apt-get install -y postgresql" >&2; exit 1; }

echo "building ($PROFILE) ..."
flag=()
[[ $PROFILE == release ]] && flag=(--release)
(cd "$root" && cargo build "${flag[@]}" -p chatcluster-gateway -p chatcluster-worker --bins)
bin=$root/target/$PROFILE

mkdir -p "$STATE_DIR"/{sockets,redis,logs}
pids=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
    trap - EXIT INT TERM
    echo "stopping ..."
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2> /dev/null || true; done
    wait 2> /dev/null || true
}
trap cleanup EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE_DIR/redis" --appendonly yes \
    --appendfsync "$APPENDFSYNC" --save '' > "$STATE_DIR/logs/redis.log" 2>&1 &
pids+=($!)

as_pg=()
if [[ $(id -u) -eq 0 ]]; then
    as_pg=(runuser -u postgres --)
    chown postgres: "$STATE_DIR"
fi
if [[ ! -f $STATE_DIR/pg/PG_VERSION ]]; then
    echo "initdb into $STATE_DIR/pg ..."
    "${as_pg[@]}" "$pg_bin/initdb" -D "$STATE_DIR/pg" -U postgres --auth=trust -E UTF8 --locale=C > "$STATE_DIR/logs/initdb.log"
fi
"${as_pg[@]}" "$pg_bin/postgres" -D "$STATE_DIR/pg" -p "$PG_PORT" -c listen_addresses=127.0.0.1 \
    -c unix_socket_directories="$STATE_DIR/pg" > "$STATE_DIR/logs/postgres.log" 2>&1 &
pids+=($!)
until "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do sleep 0.2; done

export REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
ADMIN_ADDR=127.0.0.1:9091 "$bin/chatcluster-worker" > "$STATE_DIR/logs/worker.log" 2>&1 &
pids+=($!)

servers=""
for ((i = 0; i < GATEWAYS; i++)); do
    socket=$STATE_DIR/sockets/gateway-$i.sock
    SOCKET_PATH=$socket ADMIN_ADDR=127.0.0.1:$((9100 + i)) INSTANCE_ID=gateway-$i \
        "$bin/chatcluster-gateway" > "$STATE_DIR/logs/gateway-$i.log" 2>&1 &
    pids+=($!)
    servers+="  server gw$i unix@$socket check"$'\n'
    until [[ -S $socket ]]; do sleep 0.1; done
done

cat > "$STATE_DIR/haproxy.cfg" << CFG
global
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  timeout client-fin 5s
  timeout http-request 10s
  option redispatch
  option http-no-delay
  retries 3
frontend ws
  bind 127.0.0.1:$PORT
  default_backend gateways
frontend stats
  bind 127.0.0.1:$STATS_PORT
  http-request use-service prometheus-exporter if { path /metrics }
  stats enable
  stats uri /stats
backend gateways
  balance leastconn
  option httpchk GET /health
  default-server inter 1s fall 2 rise 1
$servers
CFG
haproxy -db -f "$STATE_DIR/haproxy.cfg" > "$STATE_DIR/logs/haproxy.log" 2>&1 &
pids+=($!)

cat << MSG

chatcluster is running:
  web chat     http://127.0.0.1:$PORT/
  WebSocket    ws://127.0.0.1:$PORT/ws
  HAProxy      http://127.0.0.1:$STATS_PORT/stats  (Prometheus: /metrics)
  gateways     $GATEWAYS processes on $STATE_DIR/sockets/ (metrics: http://127.0.0.1:9100/metrics ...)
  worker       http://127.0.0.1:9091/metrics
  Redis        $REDIS_URL
  PostgreSQL   $DATABASE_URL
  logs         $STATE_DIR/logs/
Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
echo "a process exited; see $STATE_DIR/logs/" >&2
exit 1
