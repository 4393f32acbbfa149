#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (slurmctld + slurmd on localhost, one CPU partition), for the
# cluster tests (tests/test_slurm.py) and CI; also handy to try `hydra/launcher=submitit_slurm` by hand.
#
#   scripts/slurm_cluster.sh up       # install slurm-wlm + munge if missing (apt, root), write slurm.conf,
#                                     # start munged, slurmctld, slurmd; wait until `sinfo` shows the node idle
#   scripts/slurm_cluster.sh down     # cancel the cluster's jobs, stop exactly the daemons `up` started (PIDs)
#   scripts/slurm_cluster.sh status   # exit 0 when the node is up (idle, mixed or allocated)
#   scripts/slurm_cluster.sh env      # the line to source for the SLURM clients: export SLURM_CONF=...
#
# Everything lives in $FEWSTEP_SLURM_DIR (default /tmp/fewstep-slurm): slurm.conf, state, logs, and one pid
# file per daemon it started. `up` is idempotent (a cluster it already started is reused; a munged that
# already answers is used, not started again); `down` leaves alone what it did not start.
# Exit codes: 0 ok, 3 cannot run here (not root / no apt-get / install failed: the reason is printed),
# 1 the daemons did not come up (their log tails are printed, and what was started is stopped again).
#
# The node has this host's CPUs (nproc) and memory (/proc/meminfo, less 1 GiB); the partition lets up to 4
# jobs share a CPU (OverSubscribe=FORCE:4), so tiny test jobs run side by side. No accounting database
# (sacct does not work; fewstep's launcher reads job states from squeue), no cgroups (proctrack/linuxproc,
# task/none): it runs in a container without systemd. AuthInfo=cred_expire=10: a requeued job (submitit's
# requeue after a timeout) may start again 11 s later instead of the default 121 s.
set -euo pipefail

STATE=${FEWSTEP_SLURM_DIR:-/tmp/fewstep-slurm}
CONF=$STATE/slurm.conf
MARK="# written by fewstep scripts/slurm_cluster.sh"
DAEMONS=(munged slurmctld slurmd)       # start order; stopped in reverse

say() { echo "[slurm_cluster] $*"; }
cannot() { say "cannot run: $*"; exit 3; }

alive() {  # alive NAME: the pid in $STATE/NAME.pid runs a process called NAME
    local f=$STATE/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$1" ]]
}

node_state() {  # idle, mix, alloc, down, ... of the node; nothing when no slurmctld answers
    [[ -s $CONF ]] || return 0
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -o %t 2>/dev/null | head -1 || true
}

install() {
    local missing=()
    for c in munged munge slurmctld slurmd sinfo sbatch; do command -v "$c" >/dev/null || missing+=("$c"); done
    [[ ${#missing[@]} == 0 ]] && return 0
    [[ $(id -u) == 0 ]] || cannot "${missing[*]} missing and not root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || cannot "${missing[*]} missing and no apt-get (install slurm-wlm and munge)"
    say "installing slurm-wlm munge (apt-get)"
    # no service may start from the packages' maintainer scripts: this script starts (and stops) the daemons
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; own_policy=1; fi
    local log=$STATE/log/apt.log rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge; } >"$log" 2>&1 || rc=$?
    [[ $own_policy == 1 ]] && rm -f "$policy"
    [[ $rc == 0 ]] || { tail -5 "$log"; cannot "apt-get install slurm-wlm munge failed (log: $log)"; }
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc honours OMP_NUM_THREADS: not for this
    mem_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024) - 1024; print (m < 512 ? 512 : m)}' /proc/meminfo)
    cat >"$CONF" <<EOF
$MARK ($(date -u +%FT%TZ)): a single-node cluster
ClusterName=fewstep
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/spool/slurmctld.pidfile
SlurmdPidFile=$STATE/spool/slurmd.pidfile
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    # the clients' default path too, unless another cluster's config is there
    if [[ ! -e /etc/slurm/slurm.conf ]] || head -1 /etc/slurm/slurm.conf | grep -qF "$MARK"; then
        mkdir -p /etc/slurm && cp "$CONF" /etc/slurm/slurm.conf
    fi
}

start() {  # start NAME CMD...: run in the foreground of a background job, its pid in $STATE/NAME.pid
    local name=$1; shift
    "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/$name.pid"
    sleep 0.5
    alive "$name" || { say "$name exited at once:"; tail -20 "$STATE/log/$name.out" "$STATE/log/$name.log" 2>/dev/null; return 1; }
    say "started $name (pid $(<"$STATE/$name.pid"))"
}

stop() {  # stop the daemons this script started (pid files), slurmd first
    local i name pid
    if command -v squeue >/dev/null && alive slurmctld; then   # jobs of this cluster would outlive slurmd
        SLURM_CONF=$CONF timeout 10 scancel --full --user "$(id -un)" 2>/dev/null || true
        for _ in $(seq 20); do [[ -z $(SLURM_CONF=$CONF timeout 5 squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.5; done
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        if alive "$name"; then
            pid=$(<"$STATE/$name.pid")
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do alive "$name" || break; sleep 0.2; done
            alive "$name" && kill -KILL "$pid" 2>/dev/null || true
            say "stopped $name (pid $pid)"
        fi
        rm -f "$STATE/$name.pid"
    done
}

up() {
    mkdir -p "$STATE"/{log,spool/slurmctld,spool/slurmd}
    if alive slurmctld && alive slurmd && [[ $(node_state) =~ ^(idle|mix|alloc) ]]; then
        say "already up ($(node_state)): SLURM_CONF=$CONF"; return 0
    fi
    [[ $(id -u) == 0 ]] || cannot "not root (the daemons run as root here; a cluster of your own: see README)"
    install
    # munge: a key, its run/state dirs, and a munged unless one already answers
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    local mu=root
    id munge >/dev/null 2>&1 && mu=munge
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$mu" /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if ! { munge -n | unmunge; } >/dev/null 2>&1; then
        start munged setpriv --reuid="$mu" --regid="$mu" --init-groups munged -F
        for _ in $(seq 20); do { munge -n | unmunge; } >/dev/null 2>&1 && break; sleep 0.25; done
    fi
    # slurm: a fresh config (this host's CPUs and memory) and fresh daemons
    stop_slurm_only
    write_conf
    export SLURM_CONF=$CONF
    start slurmctld slurmctld -D -c -i -f "$CONF" || { stop; return 1; }
    start slurmd slurmd -D -f "$CONF" || { stop; return 1; }
    local s=""
    for i in $(seq 120); do
        s=$(node_state)
        [[ $s =~ ^(idle|mix|alloc)$ ]] && break
        # a node that slurmctld remembers as down (an earlier run) is resumed
        if [[ $s =~ ^(down|drain|drng|unk) && $((i % 10)) == 0 ]]; then
            scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
        fi
        sleep 0.5
    done
    if [[ ! $s =~ ^(idle|mix|alloc)$ ]]; then
        say "the node did not come up (sinfo: '${s:-no answer}'):"
        tail -15 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" "$STATE"/log/*.out 2>/dev/null || true
        stop; return 1
    fi
    say "up: node $(hostname -s) $s, $(awk -F"CPUs=" '/^NodeName=/ {split($2, a, " "); print a[1]}' "$CONF") CPUs; SLURM_CONF=$CONF"
}

stop_slurm_only() {  # slurmctld / slurmd of an earlier `up` whose node never came idle
    local name pid
    for name in slurmd slurmctld; do
        if alive "$name"; then
            pid=$(<"$STATE/$name.pid"); kill -TERM "$pid"; for _ in $(seq 50); do alive "$name" || break; sleep 0.2; done
            alive "$name" && kill -KILL "$pid" || true
        fi
        rm -f "$STATE/$name.pid"
    done
}

case "${1:-}" in
    up) up ;;
    down) mkdir -p "$STATE"; stop ;;
    status) s=$(node_state); echo "${s:-down}"; [[ $s =~ ^(idle|mix|alloc) ]] ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
