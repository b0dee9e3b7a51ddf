#!/usr/bin/env bash
# A one-node SLURM cluster in a folder, for the tests (tests/test_slurm_cluster.py) and for trying qreg's SLURM path by hand.
#
#   eval "$(scripts/slurm/local-cluster.sh up /tmp/qreg-slurm)"   # prints: export SLURM_CONF=...
#   sbatch ...; squeue; sinfo
#   scripts/slurm/local-cluster.sh down /tmp/qreg-slurm
#
# It installs nothing: it needs munged, slurmctld, slurmd and sinfo (Debian: apt-get install
# --no-install-recommends slurm-wlm munge) and exits with status 3 naming what is missing. Everything it writes
# (slurm.conf, the munge key, state, logs, pid files) stays in the folder; the three daemons run in the
# foreground of background shells, so each pid is known and `down` stops exactly those (no systemd, no pkill).
# One node, "localhost", with this machine's CPUs (at most 2, so that jobs never oversubscribe a shared box
# less than the tests expect), no GPUs, no accounting.
set -euo pipefail

usage() { echo "usage: $0 up|down <folder>" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
folder=$(mkdir -p "$2" && cd "$2" && pwd)

missing=()
for binary in munged slurmctld slurmd sinfo scontrol sbatch; do
    command -v "$binary" >/dev/null 2>&1 || [[ -x /usr/sbin/$binary ]] || missing+=("$binary")
done

stop() {
    # slurmd first (it may still be ending a job step), then the controller, then munge.
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -f $folder/$name.pid ]] || continue
        pid=$(cat "$folder/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$folder/$name.pid"
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "local-cluster: missing ${missing[*]} (apt-get install --no-install-recommends slurm-wlm munge)" >&2
        exit 3
    fi
    export PATH=$PATH:/usr/sbin
    mkdir -p "$folder/state" "$folder/spool" "$folder/munge"
    chmod 700 "$folder/munge"
    # A fresh key per cluster: munge accepts only a key that is the user's own and unreadable by others.
    head -c 1024 /dev/urandom > "$folder/munge/munge.key"
    chmod 600 "$folder/munge/munge.key"
    local cpus
    cpus=$(nproc)
    (( cpus > 2 )) && cpus=2
    cat > "$folder/slurm.conf" <<EOF
ClusterName=qreg-local
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$folder/munge/munge.socket
CredType=cred/munge
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
StateSaveLocation=$folder/state
SlurmdSpoolDir=$folder/spool
SlurmctldPidFile=$folder/slurmctld.daemon.pid
SlurmdPidFile=$folder/slurmd.daemon.pid
SlurmctldLogFile=$folder/slurmctld.log
SlurmdLogFile=$folder/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
# seconds between the SIGTERM of a cancel, requeue or time limit and the SIGKILL
KillWait=30
# a finished job stays visible to scontrol for this long (the tests read its state)
MinJobAge=600
NodeName=localhost CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$folder/slurm.conf
    munged --foreground --force --key-file="$folder/munge/munge.key" --socket="$folder/munge/munge.socket" \
        --pid-file="$folder/munge/munged.pid" --log-file="$folder/munge/munged.log" \
        --seed-file="$folder/munge/munged.seed" > "$folder/munged.out" 2>&1 &
    echo $! > "$folder/munged.pid"
    for _ in $(seq 100); do [[ -S $folder/munge/munge.socket ]] && break; sleep 0.05; done
    slurmctld -D -i -f "$folder/slurm.conf" > "$folder/slurmctld.out" 2>&1 &
    echo $! > "$folder/slurmctld.pid"
    slurmd -D -N localhost -f "$folder/slurm.conf" > "$folder/slurmd.out" 2>&1 &
    echo $! > "$folder/slurmd.pid"
    # Up when the node is idle (the controller answers and has heard from slurmd); at most 30 s.
    for _ in $(seq 300); do
        if [[ $(sinfo --noheader --nodes=localhost --format=%t 2>/dev/null) == idle ]]; then
            echo "export SLURM_CONF=$folder/slurm.conf"
            return 0
        fi
        sleep 0.1
    done
    echo "local-cluster: the node did not become idle in 30 s; logs in $folder" >&2
    tail -n 5 "$folder"/*.log "$folder"/*.out >&2 || true
    stop
    exit 1
}

case $action in
    up) start ;;
    down) stop ;;
    *) usage ;;
esac
