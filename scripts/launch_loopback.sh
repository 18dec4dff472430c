#!/usr/bin/env bash
# The cluster launcher's path, exercised against this machine over SSH on loopback (issue 12):
#
#   ray up      configs/cluster_local.yaml with head_ip 127.0.0.1 and no workers (a key made for the run)
#   ray exec    a small synthetic data set and its cache on the "head"
#   ray submit  scripts/run_search.py -- --config configs/search_demo.yaml (1 trial, 1 epoch)
#   ray dashboard   the head's dashboard (bound to its loopback address) forwarded over SSH
#   ray job submit  the same search as a job, through the forwarded dashboard, with the head's token
#   ray down
#
# Run as root or with sudo (it installs Debian's openssh-server and rsync, and starts sshd on
# 127.0.0.1:22 for the run). It stops by itself and puts back what it changed: the key it added to
# ~/.ssh/authorized_keys, ~/.bashrc (the launcher's setup commands extend it), sshd, and the ~/gitseg
# checkout and ~/gitseg-venv the launcher made, when they were not there before. Nothing else may use
# Ray on this machine meanwhile: `ray up` runs `ray stop`. Output: runs/launch_loopback.log.
#   bash scripts/launch_loopback.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RAY=${RAY:-$ROOT/.venv/bin/ray}           # the launcher CLI on the submitting machine (`make test` makes it)
WORK=$(mktemp -d /tmp/gitseg-launch-XXXXXX)
LOG=$ROOT/runs/launch_loopback.log
mkdir -p "$ROOT/runs"
exec > >(tee "$LOG") 2>&1
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
started=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - started )) s] $*"; }

made_checkout=0; made_venv=0
[ -e ~/gitseg ] || made_checkout=1
[ -e ~/gitseg-venv ] || made_venv=1
cp ~/.bashrc "$WORK/bashrc.before" 2>/dev/null || touch "$WORK/bashrc.before"
CFG=$WORK/cluster_loopback.yaml
up=0

cleanup() {
    status=$?
    if [ "$up" = 1 ]; then step "ray down"; "$RAY" down -y "$CFG" || true; fi
    [ -f "$WORK/sshd.pid" ] && $SUDO kill "$(cat "$WORK/sshd.pid")" 2>/dev/null || true
    [ -f ~/.ssh/authorized_keys ] && sed -i "/gitseg-loopback-$$/d" ~/.ssh/authorized_keys
    cp "$WORK/bashrc.before" ~/.bashrc
    [ "$made_checkout" = 1 ] && rm -rf ~/gitseg
    [ "$made_venv" = 1 ] && rm -rf ~/gitseg-venv
    rm -rf "$WORK"
    echo; echo "=== finished in $(( $(date +%s) - started )) s with status $status (log: $LOG)"
}
trap cleanup EXIT

step "install openssh-server and rsync (Debian)"
command -v sshd >/dev/null 2>&1 && command -v rsync >/dev/null 2>&1 \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y -q openssh-server rsync; }

step "a key for this run, and sshd on 127.0.0.1:22"
ssh-keygen -q -t ed25519 -N "" -C "gitseg-loopback-$$" -f "$WORK/id_ed25519"
mkdir -p ~/.ssh && chmod 700 ~/.ssh
cat "$WORK/id_ed25519.pub" >> ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys
$SUDO mkdir -p /run/sshd && $SUDO ssh-keygen -A >/dev/null
$SUDO "$(command -v sshd)" -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no -o PidFile="$WORK/sshd.pid"
sleep 1
ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -i "$WORK/id_ed25519" "$(id -un)@127.0.0.1" true
echo "ssh to 127.0.0.1 works"

step "the cluster config: configs/cluster_local.yaml with this machine as the head and no workers"
"$ROOT/.venv/bin/python" - "$ROOT/configs/cluster_local.yaml" "$CFG" "$(id -un)" "$WORK/id_ed25519" <<'EOF'
import sys, yaml
source, target, user, key = sys.argv[1:]
cfg = yaml.safe_load(open(source))
cfg["cluster_name"] = "gitseg-loopback"
cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
cfg["auth"] = {"ssh_user": user, "ssh_private_key": key}
cfg["min_workers"] = cfg["max_workers"] = 0
yaml.safe_dump(cfg, open(target, "w"), sort_keys=False)
EOF
cat "$CFG"

cd "$ROOT"   # file_mounts copy "." : this checkout
step "ray up"
up=1
"$RAY" up -y --no-config-cache "$CFG"

step "ray exec: a small data set and its cache on the head"
"$RAY" exec "$CFG" "cd ~/gitseg && gitseg synth --out runs/loopback/data --cases 4 --days 2 --slices 16 \
    --size 64 --test-cases 0 --overwrite && gitseg prepare --data runs/loopback/data --out runs/loopback/cache \
    --size 64 --folds 2 --holdout 0"

# A 1-trial, 1-epoch search of the demo config; 2 workers of half a CPU each fit the 2-core head.
SEARCH_ARGS="--config configs/search_demo.yaml --set num_samples=1 --set refit.topk=0 \
 --set workers.cpus_per_worker=0.5 --set 'set=[data.cache=runs/loopback/cache, out=runs/loopback/train, train.epochs=1]'"

step "ray submit scripts/run_search.py"
"$RAY" submit "$CFG" scripts/run_search.py -- $SEARCH_ARGS --set storage_path=runs/loopback/submit
"$RAY" exec "$CFG" "cat ~/gitseg/runs/loopback/submit/demo/leaderboard.csv"

step "ray dashboard: the head's dashboard forwarded over SSH to local port 8266"
"$RAY" dashboard --port 8266 "$CFG" > "$WORK/dashboard.log" 2>&1 &
forward=$!
for _ in $(seq 30); do curl -s -o /dev/null http://localhost:8266 && break; sleep 1; done
# Ray 2.59+ starts clusters with token authentication: a client needs the head's token.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$RAY" exec "$CFG" "cat ~/.ray/auth_token" 2>/dev/null | tail -n 1 | tr -d '\r')
export RAY_AUTH_TOKEN

step "ray job submit, through the forwarded dashboard"
"$RAY" job submit --address http://localhost:8266 -- \
    bash -c "cd ~/gitseg && python -m search $SEARCH_ARGS --set storage_path=runs/loopback/job"
kill "$forward" 2>/dev/null || true
"$RAY" exec "$CFG" "cat ~/gitseg/runs/loopback/job/demo/leaderboard.csv"

step "the dashboard listens on loopback only"
"$RAY" exec "$CFG" "(ss -ltnp 2>/dev/null || netstat -ltnp) | grep ':8265'"
