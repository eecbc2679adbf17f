# Shared by the Redis benchmarks (sourced: . "$(dirname "$0")/redis_lib.sh"):
# private redis-servers on free loopback ports, one or a Redis Cluster, and
# their stop. POSIX sh.
#
#   redis_start DIR [ARG...]   a redis-server, files in DIR (no persistence
#                              unless ARGs say so); sets REDIS_PORT, REDIS_URL
#   redis_cluster_start DIR N  a Redis Cluster of N masters (no replicas; N
#                              of 1 or 2 too, made by hand),
#                              each node's files in DIR/PORT; waits for
#                              cluster_state:ok on every node; sets
#                              CLUSTER_PORTS (space-separated) and
#                              CLUSTER_URL (their URLs, comma-separated)
#   redis_flush PORT...        FLUSHALL on each
#   redis_stop_all             stops every server started here (call it from
#                              the caller's EXIT trap)

REDIS_PIDS=""

# A free loopback port (the kernel's choice).
redis_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A port P below the ephemeral range with P and P+10000 (its cluster bus)
# both free.
redis_free_cluster_port() {
  python3 - <<'PY'
import random, socket
for _ in range(1000):
    p = random.randrange(10000, 22000)
    ok = True
    for q in (p, p + 10000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", q))
        except OSError:
            ok = False
        s.close()
    if ok:
        print(p)
        break
PY
}

# redis_wait_ping PORT: until it answers PONG (5 s at most).
redis_wait_ping() {
  for _i in $(seq 100); do
    [ "$(redis-cli -p "$1" PING 2>/dev/null)" = PONG ] && return 0
    sleep 0.05
  done
  echo "redis-server on port $1 did not start" >&2
  return 1
}

redis_start() {
  _dir=$1; shift
  REDIS_PORT=$(redis_free_port)
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
    --appendonly no --daemonize no --dir "$_dir" "$@" >/dev/null 2>&1 &
  REDIS_PIDS="$REDIS_PIDS $!"
  redis_wait_ping "$REDIS_PORT"
}

redis_cluster_start() {
  _dir=$1; _n=$2
  CLUSTER_PORTS=""
  CLUSTER_URL=""
  _addrs=""
  for _i in $(seq "$_n"); do
    _p=$(redis_free_cluster_port)
    mkdir -p "$_dir/$_p"
    redis-server --port "$_p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "nodes-$_p.conf" --cluster-node-timeout 2000 \
      --save '' --appendonly no --daemonize no --dir "$_dir/$_p" \
      >/dev/null 2>&1 &
    REDIS_PIDS="$REDIS_PIDS $!"
    redis_wait_ping "$_p" || return 1
    CLUSTER_PORTS="$CLUSTER_PORTS $_p"
    CLUSTER_URL="$CLUSTER_URL${CLUSTER_URL:+,}redis://127.0.0.1:$_p"
    _addrs="$_addrs 127.0.0.1:$_p"
  done
  CLUSTER_PORTS=${CLUSTER_PORTS# }
  if [ "$_n" -ge 3 ]; then
    # shellcheck disable=SC2086
    redis-cli --cluster create $_addrs --cluster-yes >/dev/null || return 1
  else
    # redis-cli --cluster create wants 3 masters at least: by hand, as it
    # does (slots in equal ranges, distinct config epochs, MEET).
    _i=0
    _first=${CLUSTER_PORTS%% *}
    for _p in $CLUSTER_PORTS; do
      _a=$((_i * 16384 / _n))
      _b=$(((_i + 1) * 16384 / _n - 1))
      redis-cli -p "$_p" CLUSTER ADDSLOTSRANGE "$_a" "$_b" >/dev/null
      redis-cli -p "$_p" CLUSTER SET-CONFIG-EPOCH $((_i + 1)) >/dev/null
      [ "$_p" = "$_first" ] ||
        redis-cli -p "$_p" CLUSTER MEET 127.0.0.1 "$_first" >/dev/null
      _i=$((_i + 1))
    done
  fi
  for _i in $(seq 300); do
    _ok=1
    for _p in $CLUSTER_PORTS; do
      redis-cli -p "$_p" CLUSTER INFO 2>/dev/null | grep -q '^cluster_state:ok' \
        || _ok=0
    done
    [ $_ok = 1 ] && return 0
    sleep 0.1
  done
  echo "the cluster on $CLUSTER_PORTS did not reach cluster_state:ok" >&2
  return 1
}

redis_flush() {
  for _p in "$@"; do
    redis-cli -p "$_p" FLUSHALL >/dev/null
  done
}

redis_stop_all() {
  for _p in $REDIS_PIDS; do
    kill "$_p" 2>/dev/null || true
  done
  for _p in $REDIS_PIDS; do
    wait "$_p" 2>/dev/null || true
  done
  REDIS_PIDS=""
}
