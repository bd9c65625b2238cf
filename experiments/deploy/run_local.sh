#!/usr/bin/env bash
# Run fedprune on a real Flower deployment on this machine: one SuperLink and N SuperNodes
# as separate processes on loopback, then `flwr run` against them. Secure by default:
# TLS on the SuperLink (a private CA; SuperNodes and `flwr` trust only that CA) and
# SuperNode authentication (each node's public key registered with
# `flwr supernode register` before the node starts; unregistered nodes are refused).
#
# Usage:
#   bash experiments/deploy/run_local.sh [--nodes 2] [--port 9190] [--config NAME]
#        [--overrides "k=v ..."] [--log-dir DIR] [--node-port-base PORT]
#        [--pki DIR] [--insecure] [--netns PREFIX] [--resume RUN_DIR]
#        [--restart-nodes] [--timeout SECONDS] [-- EXTRA_FLWR_RUN_ARGS...]
#
#   --nodes N           SuperNodes to start (default 2); node i gets
#                       --node-config "partition-id=i num-partitions=N", so N must equal
#                       the config's data.num_clients.
#   --port P            SuperLink HTTP port (Fleet, Control and runtime APIs; default 9190,
#                       or $FEDPRUNE_SUPERLINK_PORT).
#   --node-port-base B  SuperNode i serves its runtime API on B+i (default P+1).
#   --config NAME       YAML name in experiments/configs/ or a path (default deploy_smoke).
#   --overrides "..."   space-separated key=value pairs, e.g. "fed.rounds=3 run.name=x".
#                       Give an absolute run.out_dir: the ServerApp does not run in the repo.
#                       Default: run.out_dir=<repo>/runs.
#   --log-dir DIR       process logs, the private FLWR_HOME and the `pids` file
#                       (default <repo>/runs/deploy-logs/<timestamp>).
#   --pki DIR           certificates and node keys made by `fedprune certs --out DIR
#                       --nodes N` (default: a fresh set in <log-dir>/pki). Checked before
#                       anything starts: in date, signed by the CA, naming 127.0.0.1.
#   --insecure          plaintext, no node authentication: local experiments only (warns).
#   --netns PREFIX      every component on its own "host": a network namespace with its
#                       own address on a private bridge (experiments/deploy/netns.sh; root),
#                       the SuperLink at .1, the operator running `flwr` at .2, SuperNode i
#                       at .(10+i); all torn down on exit, also after a failure.
#   --restart-nodes     supervise the SuperNodes: one that dies while the run goes on is
#                       started again with the same key and partition (logged, and listed
#                       in pids as supernode-i:restart-k).
#   --resume RUN_DIR    continue the run in RUN_DIR from its last checkpoint (e.g. after
#                       the SuperLink went down); the config comes from RUN_DIR.
#   --timeout S         give up on `flwr run` after S seconds (default 3600).
#   Anything after `--` (and any option not listed here) goes to `flwr run` unchanged.
#
# Example (2 rounds, 2 nodes, well under a minute of compute):
#   FEDPRUNE_DATA_ROOT=/work/shared/data bash experiments/deploy/run_local.sh \
#       --overrides "run.out_dir=$PWD/runs run.name=deploy-smoke"
#
# Exits 0 only if `flwr ls` reports the run as finished:completed (`flwr run --stream`
# alone exits 0 even when the ServerApp crashed). Every process group it started, and
# every process they spawned (Flower detaches its SuperExec into a new session), is
# stopped on exit, Ctrl-C or SIGTERM. `<log-dir>/pids` lists "name pid" for each.
# Uses the Flower binaries of the active virtualenv ($VIRTUAL_ENV, else the one whose
# `flwr` is first on PATH, else <repo>/.venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NODES=2
PORT=${FEDPRUNE_SUPERLINK_PORT:-9190}
NODE_PORT_BASE=""
CONFIG=deploy_smoke
OVERRIDES=""
LOG_DIR=""
RUN_TIMEOUT=3600
PKI=""
INSECURE=0
NETNS=""
RESUME=""
RESTART_NODES=0
HOST=127.0.0.1
CONNECTION=fedprune-local
EXTRA=()

die() { echo "run_local.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=${2:?--nodes needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --node-port-base) NODE_PORT_BASE=${2:?--node-port-base needs a value}; shift 2 ;;
        --config) CONFIG=${2:?--config needs a value}; shift 2 ;;
        --overrides) OVERRIDES=${2?--overrides needs a value}; shift 2 ;;
        --log-dir) LOG_DIR=${2:?--log-dir needs a value}; shift 2 ;;
        --timeout) RUN_TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --pki) PKI=${2:?--pki needs a value}; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        --netns) NETNS=${2:?--netns needs a prefix}; shift 2 ;;
        --resume) RESUME=${2:?--resume needs a run folder}; shift 2 ;;
        --restart-nodes) RESTART_NODES=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
NODE_PORT_BASE=${NODE_PORT_BASE:-$((PORT + 1))}
[[ $NODE_PORT_BASE =~ ^[0-9]+$ ]] || die "--node-port-base must be a number"
[[ $CONFIG != *"'"* && $OVERRIDES != *"'"* ]] || die "--config/--overrides may not contain '"
# The ServerApp runs outside the repo: make a config given as a relative path absolute.
if [ -f "$CONFIG" ]; then CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG"); fi
[[ " $OVERRIDES" == *" run.out_dir="* ]] || OVERRIDES="run.out_dir=$REPO/runs $OVERRIDES"

# ---- the Flower binaries of this virtualenv; children find flower-superexec etc. on PATH
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/flower-superlink" ]; then
    BIN=$VIRTUAL_ENV/bin
elif command -v flower-superlink >/dev/null 2>&1; then
    BIN=$(dirname "$(command -v flower-superlink)")
elif [ -x "$REPO/.venv/bin/flower-superlink" ]; then
    BIN=$REPO/.venv/bin
else
    die "no flower-superlink found: activate the venv or run experiments/setup.sh"
fi
export PATH="$BIN:$PATH"
for exe in flower-superlink flower-supernode flower-superexec flwr python fedprune; do
    [ -x "$BIN/$exe" ] || die "$BIN/$exe is missing"
done

# ---- logs, private FLWR_HOME, environment of everything started below
LOG_DIR=${LOG_DIR:-$REPO/runs/deploy-logs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
PIDS_FILE=$LOG_DIR/pids
: > "$PIDS_FILE"
export FLWR_HOME=$LOG_DIR/flwr-home
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
log() { echo "[run_local] $*" >&2; }

# ---- process bookkeeping: every start is `setsid`, so its pid is its process group
GROUPS_STARTED=()
start() {  # start NAME LOGFILE CMD... : new session/process group, recorded in pids
    local name=$1 logfile=$2
    shift 2
    setsid "$@" >"$logfile" 2>&1 </dev/null &
    local pid=$!
    GROUPS_STARTED+=("$pid")
    echo "$name $pid" >>"$PIDS_FILE"
}

descendants() {  # all live descendants of the given pids (Flower detaches some children)
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " ")
                for (i = 1; i <= n; i++) { keep[r[i]] = 1; root[r[i]] = 1 } }
        { parent[$1] = $2; pids[++m] = $1 }
        END { do { changed = 0
                  for (i = 1; i <= m; i++) { p = pids[i]
                      if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
              } while (changed)
              for (p in keep) if (!(p in root)) print p }'
}

marked() {  # processes carrying this run's private FLWR_HOME, wherever they were re-parented
    # (this script's own helpers share its session: every Flower process runs in another)
    "$BIN/python" - "FLWR_HOME=$FLWR_HOME" "$$" <<'EOF'
import os, sys
marker, own = sys.argv[1].encode(), os.getsid(int(sys.argv[2]))
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if marker in env and os.getsid(int(pid)) != own:
            print(pid)
    except OSError:
        continue
EOF
}
alive() { kill -0 "$1" 2>/dev/null; }
running() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $st != Z* ]]; }
group_running() {  # a live (not zombie) process in process group $1
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}
listening() { $(on "$1") bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; }  # HOST ADDR PORT
port_free() { ! listening "$@"; }
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

NETNS_UP=0
teardown_hosts() {
    [ "$NETNS_UP" = 1 ] || return 0
    bash "$REPO/experiments/deploy/netns.sh" down "$NETNS" >&2 \
        || log "could not remove every namespace of $NETNS (netns.sh down $NETNS)"
}

CLEANED=0
cleanup() {
    local rc=$?
    set +e
    [ "$CLEANED" = 1 ] && return
    CLEANED=1
    trap - INT TERM
    if [ ${#GROUPS_STARTED[@]} -eq 0 ]; then teardown_hosts; exit "$rc"; fi
    # Snapshot the whole tree first: a detached child is re-parented once its parent dies.
    local extra pid name
    extra=$({ descendants "${GROUPS_STARTED[@]}"; marked; } | sort -nu)
    for pid in $extra; do
        name=$(ps -o comm= -p "$pid" 2>/dev/null || true)
        echo "child:${name:-gone} $pid" >>"$PIDS_FILE"
    done
    log "stopping ${#GROUPS_STARTED[@]} process groups (+$(echo $extra | wc -w) descendants)"
    # SuperNodes and flwr run first, the SuperLink (started first) last.
    local i
    for ((i = ${#GROUPS_STARTED[@]} - 1; i >= 0; i--)); do
        kill -TERM -- "-${GROUPS_STARTED[i]}" 2>/dev/null || true
    done
    for pid in $extra; do kill -TERM "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 15)) left
    while :; do
        left=0
        for pid in "${GROUPS_STARTED[@]}"; do group_alive "$pid" && left=1; done
        for pid in $extra; do alive "$pid" && left=1; done
        [ $left = 0 ] || [ $SECONDS -ge $deadline ] && break
        sleep 0.5
    done
    if [ $left = 1 ]; then
        log "some processes ignored SIGTERM; sending SIGKILL"
        for pid in "${GROUPS_STARTED[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
        for pid in $extra; do kill -KILL "$pid" 2>/dev/null || true; done
        sleep 0.5
    fi
    [ -n "${TAIL_PID:-}" ] && kill "$TAIL_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    teardown_hosts
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- hosts: loopback, or one network namespace per component (--netns)
on() { [ -z "$NETNS" ] || echo "ip netns exec $NETNS-$1"; }  # command prefix for host $1
if [ -n "$NETNS" ]; then
    # `up` removes what it made if it fails, and refuses (touching nothing) a prefix in
    # use: only namespaces this run made are torn down on exit
    TABLE=$(bash "$REPO/experiments/deploy/netns.sh" up "$NETNS" "$NODES") \
        || die "could not make the network namespaces of --netns $NETNS"
    NETNS_UP=1
    echo "$TABLE" >"$LOG_DIR/hosts"
    HOST=$(awk '$1 == "link" {print $3}' <<<"$TABLE")
    log "hosts (network namespaces): $(tr '\n' ';' <<<"$TABLE")"
fi

# ---- security: TLS + node authentication, or plaintext on explicit request
if [ "$INSECURE" = 1 ]; then
    [ -z "$PKI" ] || die "--insecure and --pki exclude each other"
    log "WARNING: --insecure: plaintext traffic and no SuperNode authentication; anyone" \
        "who reaches $HOST:$PORT can join as a node or submit an app. Local experiments only."
    SUPERLINK_SECURITY=(--insecure)
    CONNECTION_SECURITY='insecure = true'
else
    if [ -z "$PKI" ]; then
        PKI=$LOG_DIR/pki
        fedprune certs --out "$PKI" --hosts "$HOST,localhost" --nodes "$NODES" >&2 \
            || die "could not make certificates in $PKI"
    fi
    PKI=$(cd "$PKI" 2>/dev/null && pwd) || die "--pki folder does not exist"
    fedprune certs --check --out "$PKI" --hosts "$HOST" --nodes "$NODES" >&2 \
        || die "the certificates in $PKI cannot serve this deployment (see above)"
    # Process isolation: the ServerApp's SuperExec is our own process, authenticated to
    # the SuperLink's Runtime API by the shared secret. (Flower ignores the secret in the
    # default subprocess mode, and the Runtime API shares the port every node reaches.)
    SUPERLINK_SECURITY=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.crt"
                        --ssl-keyfile "$PKI/server.key" --enable-supernode-auth
                        --isolation process --superexec-auth-secret-file "$PKI/superexec.secret")
    CONNECTION_SECURITY="root-certificates = \"$PKI/ca.crt\""
fi
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "$HOST:$PORT"
$CONNECTION_SECURITY
EOF


wait_for_port() {  # wait_for_port HOSTNAME ADDR PORT PID SECONDS
    local deadline=$((SECONDS + $5))
    until listening "$1" "$2" "$3"; do
        alive "$4" || { log "process $4 exited before listening on $2:$3 ($1)"; return 1; }
        [ $SECONDS -lt $deadline ] || { log "nothing listens on $2:$3 ($1) after $5 s"; return 1; }
        sleep 0.3
    done
}

# ---- SuperLink
log "logs: $LOG_DIR (bin: $BIN)"
port_free link "$HOST" "$PORT" || die "port $HOST:$PORT is in use (choose another with --port)"
start superlink "$LOG_DIR/superlink.log" $(on link) flower-superlink \
    "${SUPERLINK_SECURITY[@]}" --disable-runtime-dependency-installation \
    --host "$HOST" --port "$PORT"
SUPERLINK_PID=${GROUPS_STARTED[-1]}
wait_for_port link "$HOST" "$PORT" "$SUPERLINK_PID" 60 \
    || { tail -n 30 "$LOG_DIR/superlink.log" >&2; exit 1; }
log "SuperLink up on $HOST:$PORT (pid $SUPERLINK_PID)"
if [ "$INSECURE" = 0 ]; then
    start superexec "$LOG_DIR/superexec.log" $(on link) flower-superexec \
        --root-certificates "$PKI/ca.crt" --superexec-auth-secret-file "$PKI/superexec.secret" \
        --runtime-api-address "$HOST:$PORT"
fi

# ---- SuperNodes, one partition each; with auth, each key is registered first. A node's
# Runtime API (its own SuperExec) listens on its host's loopback only.
NODE_HOST=127.0.0.1
NODE_PIDS=()
start_node() {  # start_node I NAME: SuperNode i, appended to NODE_PIDS / replacing entry i
    local i=$1 security=(--insecure)
    [ "$INSECURE" = 1 ] || security=(--root-certificates "$PKI/ca.crt"
                                     --auth-supernode-private-key "$PKI/nodes/node-$i")
    start "$2" "$LOG_DIR/$2.log" $(on "node-$i") flower-supernode "${security[@]}" \
        --superlink "$HOST:$PORT" --host "$NODE_HOST" --port "$((NODE_PORT_BASE + i))" \
        --node-config "partition-id=$i num-partitions=$NODES"
    NODE_PIDS[i]=${GROUPS_STARTED[-1]}
}
for ((i = 0; i < NODES; i++)); do
    port_free "node-$i" "$NODE_HOST" "$((NODE_PORT_BASE + i))" || die \
        "port $NODE_HOST:$((NODE_PORT_BASE + i)) (SuperNode $i) is in use (--node-port-base)"
    if [ "$INSECURE" = 0 ]; then
        timeout 60 $(on op) flwr supernode register "$PKI/nodes/node-$i.pub" "$CONNECTION" \
            >"$LOG_DIR/register-$i.log" 2>&1 \
            || { cat "$LOG_DIR/register-$i.log" >&2; die "could not register node key $i"; }
    fi
    start_node "$i" "supernode-$i"
done
for ((i = 0; i < NODES; i++)); do
    wait_for_port "node-$i" "$NODE_HOST" "$((NODE_PORT_BASE + i))" "${NODE_PIDS[i]}" 60 \
        || { tail -n 30 "$LOG_DIR/supernode-$i.log" >&2; exit 1; }
done
log "$NODES SuperNodes up (runtime API ports $NODE_PORT_BASE..$((NODE_PORT_BASE + NODES - 1)))"

# ---- the run; its output goes to flwr-run.log and is mirrored here
RUN_CONFIG="config='$CONFIG' overrides='$OVERRIDES'"
if [ -n "$RESUME" ]; then  # the run's own config; the ServerApp restores its checkpoint
    RESUME=$(cd "$RESUME" 2>/dev/null && pwd) || die "--resume folder $RESUME does not exist"
    [ -f "$RESUME/config.yaml" ] || die "--resume $RESUME has no config.yaml: not a run folder"
    RUN_CONFIG="config='$RESUME/config.yaml' overrides='' run_dir='$RESUME' resume=true"
fi
log "flwr run $REPO $CONNECTION --stream --run-config \"$RUN_CONFIG\" ${EXTRA[*]:-}"
start flwr-run "$LOG_DIR/flwr-run.log" timeout --kill-after=10 "$RUN_TIMEOUT" $(on op) \
    flwr run "$REPO" "$CONNECTION" --stream --run-config "$RUN_CONFIG" ${EXTRA[@]+"${EXTRA[@]}"}
RUN_PID=${GROUPS_STARTED[-1]}
tail -n +1 -F --pid="$RUN_PID" "$LOG_DIR/flwr-run.log" 2>/dev/null &
TAIL_PID=$!
RUN_RC=0
RESTARTS=0
NEXT_TRY=()
# Supervise the SuperNodes while the run goes on. A node that died without saying goodbye
# stays "online" at the SuperLink until its heartbeats are missed (about 2 heartbeat
# intervals), and its key is refused until then ("Failed to activate SuperNode"): so a
# restart is tried at most every RESTART_BACKOFF seconds per node.
RESTART_BACKOFF=10
while running "$RUN_PID"; do
    if ! group_running "$SUPERLINK_PID"; then
        log "the SuperLink is gone: the run cannot go on (continue it with --resume RUN_DIR)"
        exit 1
    fi
    if [ "$RESTART_NODES" = 1 ]; then
        for ((i = 0; i < NODES; i++)); do
            group_running "${NODE_PIDS[i]}" && continue
            [ "$SECONDS" -ge "${NEXT_TRY[i]:-0}" ] || continue
            if [ "$RESTARTS" -ge $((20 * NODES)) ]; then  # stop restarting, keep watching
                log "too many SuperNode restarts: no more"
                RESTART_NODES=0
                break
            fi
            RESTARTS=$((RESTARTS + 1))
            NEXT_TRY[i]=$((SECONDS + RESTART_BACKOFF))
            log "SuperNode $i is gone; starting it again (restart $RESTARTS)"
            start_node "$i" "supernode-$i-restart-$RESTARTS"
        done
    fi
    sleep 1
done
wait "$RUN_PID" || RUN_RC=$?
wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=""
[ "$RUN_RC" = 124 ] && log "flwr run timed out after $RUN_TIMEOUT s"
[ "$RUN_RC" = 0 ] || { log "flwr run exited with $RUN_RC"; exit 1; }

# ---- did the run really complete? (flwr run --stream exits 0 after a ServerApp crash)
RUN_ID=$(grep -oE 'run [0-9]{6,}' "$LOG_DIR/flwr-run.log" | head -n 1 | grep -oE '[0-9]+' || true)
[ -n "$RUN_ID" ] || { log "no run id in $LOG_DIR/flwr-run.log"; exit 1; }
$(on op) flwr ls "$CONNECTION" --run-id "$RUN_ID" --format json >"$LOG_DIR/flwr-ls.json" 2>&1 \
    || true
STATUS=$(python - "$LOG_DIR/flwr-ls.json" "$RUN_ID" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
try:
    data = json.loads(text[text.index("{"):])
except ValueError:
    print("unreadable")
    sys.exit()
runs = [r for r in data.get("runs", []) if str(r.get("run-id")) == sys.argv[2]]
print(runs[0].get("status", "unknown") if runs else "missing")
EOF
)
if [ "$STATUS" != "finished:completed" ]; then
    log "run $RUN_ID status: $STATUS (see $LOG_DIR/flwr-run.log, $LOG_DIR/flwr-ls.json)"
    exit 1
fi
log "run $RUN_ID finished:completed"
