#!/usr/bin/env bash
# A throwaway Slurm cluster on localhost for testing launch/slurm scripts: private munged, one slurmctld and
# NODES slurmd daemons ("nodes" that all live on 127.0.0.1, on different ports), each claiming CPUS cpus and
# GPUS fake GPUs (device files are symlinks to /dev/null; Slurm still sets CUDA_VISIBLE_DEVICES).
#
#   tests/training/slurm/local_cluster.sh start DIR   # installs Slurm with apt-get if missing (root), starts, waits idle
#   source DIR/env                                    # exports SLURM_CONF for sbatch / squeue / scontrol
#   tests/training/slurm/local_cluster.sh stop DIR    # cancels jobs and stops exactly the daemons `start` recorded
#
# Environment: NODES (default 2), CPUS per node (8), GPUS per node (8), SLURM_TEST_PORT (first of NODES+1
# consecutive free TCP ports; default: a random free range). All state, spool, logs and pid files live in DIR;
# DIR/log/jobcomp.txt keeps a line per finished job (JobState=, ExitCode=) after scontrol has forgotten it.
# Node names (bdlora-n1, bdlora-n2, ...) deliberately do not resolve: scripts must use each node's NodeAddr.
set -euo pipefail

NODES=${NODES:-2}
CPUS=${CPUS:-8}
GPUS=${GPUS:-8}
NODE_PREFIX=bdlora-n

die() { echo "local_cluster: $*" >&2; exit 1; }

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurmctld/slurmd/munged are missing and installing them needs root"
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and apt-get is not available"
    echo "local_cluster: installing slurmctld slurmd slurm-client munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >&2 \
        || die "apt-get install of slurm failed"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {
    # NODES+1 consecutive free ports: slurmctld, then one per slurmd.
    local base n ok
    for _ in $(seq 1 50); do
        base=${SLURM_TEST_PORT:-$((30000 + RANDOM % 2700))}  # below the ephemeral ports, clear of train.sbatch MASTER_PORT
        ok=1
        for n in $(seq 0 "$NODES"); do
            if port_in_use $((base + n)); then ok=0; break; fi
        done
        [[ $ok == 1 ]] && { echo "$base"; return 0; }
        [[ -n ${SLURM_TEST_PORT:-} ]] && die "ports $base..$((base + NODES)) are not all free"
    done
    die "found no free port range"
}

write_conf() {
    local dir=$1 port=$2 i names
    names="${NODE_PREFIX}[1-$NODES]"
    mkdir -p "$dir"/{state,log,gpu}
    chmod 755 "$dir"
    for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$dir/gpu/nvidia$i"; done
    {
        echo "ClusterName=bdlora-test"
        echo "SlurmctldHost=$(hostname -s)(127.0.0.1)"
        echo "SlurmctldPort=$port"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$dir/munge/munge.socket"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool-%n"
        echo "SlurmctldPidFile=$dir/slurmctld.pid"
        echo "SlurmdPidFile=$dir/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"   # no cgroups here: with proctrack/cgroup the nodes drain
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"         # needed for --gpus-per-node
        echo "SelectTypeParameters=CR_CPU"
        echo "SlurmdParameters=config_overrides"   # claim more CPUs/GPUs than the machine has
        echo "GresTypes=gpu"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/filetxt"         # one line per finished job (state, exit code): no slurmdbd,
        echo "JobCompLoc=$dir/log/jobcomp.txt"     # so sacct has nothing, and scontrol forgets jobs after MinJobAge
        echo "ReturnToService=2"
        echo "MinJobAge=4"    # sbatch --wait polls every 2 s when MinJobAge < 8 (else 2, 8, 32 s); records outlive this until a purge pass
        echo "KillWait=5"
        echo "InactiveLimit=0"
        echo "SchedulerParameters=sched_interval=1"
        for i in $(seq 1 "$NODES"); do
            echo "NodeName=$NODE_PREFIX$i NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$CPUS RealMemory=4000 Gres=gpu:$GPUS State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP"
    } >"$dir/slurm.conf"
    echo "NodeName=$names Name=gpu File=$dir/gpu/nvidia[0-$((GPUS - 1))]" >"$dir/gres.conf"
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env"
}

start_munge() {
    local dir=$1
    mkdir -p "$dir/munge"
    chmod 700 "$dir/munge"
    if [[ ! -s $dir/munge/munge.key ]]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
        || die "munged did not start (see $dir/log/munged.log)"
}

wait_idle() {
    local dir=$1 i states
    for i in $(seq 1 60); do
        states=$(SLURM_CONF=$dir/slurm.conf sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $states == "idle " ]] && return 0
        sleep 0.5
    done
    echo "local_cluster: nodes not idle after 30 s (states: ${states:-none})" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

start() {
    local dir=$1 port i
    install_slurm
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ -e $dir/slurmctld.pid ]] && die "$dir already holds a cluster (run: $0 stop $dir)"
    port=$(pick_ports)
    write_conf "$dir" "$port"
    start_munge "$dir"
    slurmctld -c -f "$dir/slurm.conf" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
    for i in $(seq 1 "$NODES"); do
        mkdir -p "$dir/spool-$NODE_PREFIX$i"
        slurmd -f "$dir/slurm.conf" -N "$NODE_PREFIX$i" || die "slurmd $NODE_PREFIX$i did not start"
    done
    wait_idle "$dir" || { stop "$dir"; exit 1; }
    echo "local_cluster: $NODES node(s) idle; SLURM_CONF=$dir/slurm.conf (controller port $port)"
}

ours() {
    # pid $1 is a daemon started for DIR $2 (its command line names DIR), not a stranger that reused a stale pid
    [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2/"
}

stop_pidfiles() {
    # SIGTERM the daemons of pid files $2... at once (each takes ~2 s to exit), SIGKILL what is left after 5 s.
    local dir=$1 f pid i alive pids=()
    shift
    for f in "$@"; do
        [[ -s $f ]] && ours "$(<"$f")" "$dir" && pids+=("$(<"$f")")
    done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for i in $(seq 1 50); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done
    rm -f "$@"
}

stop() {
    local dir=$1
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/slurm.conf ]]; then
        SLURM_CONF=$dir/slurm.conf scancel --full --quiet --user=root 2>/dev/null || true
    fi
    stop_pidfiles "$dir" "$dir"/slurmd-*.pid "$dir/slurmctld.pid"
    stop_pidfiles "$dir" "$dir/munge/munged.pid"  # last: the Slurm daemons authenticate through it while shutting down
    return 0
}

case "${1:-}" in
    start) [[ $# == 2 ]] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 start|stop DIR" ;;
esac
