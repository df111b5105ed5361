#!/usr/bin/env bash
# local_cluster.sh - a real SLURM cluster on this machine, so that tests can `sbatch` / `srun` /
# `scontrol requeue` the project's real job scripts: one node (tests/test_slurm_stage1.py), or
# SLURM_LOCAL_NODES=2 nodes (tests/test_slurm_two_nodes.py, tests/test_slurm_gen_teacher.py).
#
# The project's copy of a recipe verified on Debian 12 (bookworm), slurm-wlm 22.05.8-4+deb12u3,
# munge 0.5.15, as root on a 2-core VM whose PID 1 is not systemd (the package postinst cannot start
# services, so this script starts the daemons itself). Default plugins need no cgroups:
# proctrack/pgid + task/none, no accounting/jobcomp. Ports 6817 (slurmctld) and 6818 (slurmd) on
# 127.0.0.1 must be free. Changed from the recipe: state lives under /tmp/gd-train-slurm.
#
# Several nodes (SLURM_LOCAL_NODES=N, N >= 2): Debian's slurm-wlm is built with multiple-slurmd
# support, so N `slurmd -N nodeK` daemons on this one host make a real N-node cluster (nodes node1..N,
# NodeHostname=this host, NodeAddr=127.0.0.1, each its own Port= and CPUs=SLURM_LOCAL_NODE_CPUS (1),
# spool/pid/log per node via %n). It is a cluster of its own beside the one-node one: its own base
# folder (/tmp/gd-train-slurm-N), its own munged (own key and socket under BASE/munge, named to
# Slurm with AuthInfo=socket=), ports 24817 (slurmctld), 24818.. (slurmd), 24900-24999 (srun), and job ids
# 10000-14999 (FirstJobId, MaxJobId: see multi_config).
# What differs from real nodes: node names do not resolve (use SLURM's NodeAddr), `hostname` is the
# same everywhere, /tmp and the CPUs are shared; a "node failure" is a killed slurmd (DOWN after
# SlurmdTimeout=30 s + up to 20 s).
#
# Usage:
#   local_cluster.sh [start]  install packages if missing, start munged if no working munged, write
#                             config, start slurmctld + slurmd, wait until the node is idle (idempotent)
#   local_cluster.sh stop     cancel remaining jobs, stop slurmd/slurmctld (and munged if this script
#                             started it), by PID
#   local_cluster.sh status   show daemon PIDs and `sinfo`
#
# Knobs (environment variables):
#   SLURM_LOCAL_NODES=1               nodes of the cluster (>= 2: see above)
#   SLURM_LOCAL_NODE_CPUS=1           CPUs each node declares when SLURM_LOCAL_NODES >= 2
#   SLURM_LOCAL_BASE=/tmp/gd-train-slurm  config, state, spool, logs and pid files go here
#                                     (/tmp/gd-train-slurm-N for N >= 2 nodes)
#   SLURM_LOCAL_CRED_EXPIRE=10        AuthInfo=cred_expire; a requeued job becomes
#                                     eligible cred_expire+1 s after the requeue
#                                     (Slurm default 120 -> ~2.5 min per requeue)
#   SLURM_LOCAL_MIN_JOB_AGE=300       finished jobs stay visible to scontrol this long.
#                                     <=4 makes `sbatch --wait` poll every 2 s (otherwise
#                                     it polls after 2, 10, 42, ... s) but finished
#                                     jobs then vanish from scontrol after ~10 s.
#   SLURM_LOCAL_KILL_WAIT=5           seconds between SIGTERM and SIGKILL (default 30)
#   SLURM_LOCAL_PROCTRACK=pgid        pgid (default): kills everything left in the job's process
#                                     groups, no cgroups needed; setsid'ed processes escape.
#                                     linuxproc: orphaned background processes (parent exited)
#                                     escape and keep running after the job; an orphan inside an
#                                     srun step keeps the job RUNNING/COMPLETING until it exits.
#                                     cgroup: catches everything, needs a writable cgroup v1
#                                     freezer (present on the probe VM); writes cgroup.conf.
#   SLURM_LOCAL_CLEAN=1               wipe saved job/node state before starting
#   SLURM_LOCAL_LINK_ETC=1            also symlink /etc/slurm/slurm.conf to the generated
#                                     config so clients work without SLURM_CONF
#
# Clients need:  export SLURM_CONF=$SLURM_LOCAL_BASE/etc/slurm.conf
# (inside jobs Slurm sets SLURM_CONF itself).
set -euo pipefail

NNODES=${SLURM_LOCAL_NODES:-1}
[[ "$NNODES" =~ ^[1-9][0-9]?$ ]] || { echo "[local_cluster] ERROR: SLURM_LOCAL_NODES=$NNODES: expected 1..99" >&2; exit 2; }
if [ "$NNODES" = 1 ]; then
  BASE=${SLURM_LOCAL_BASE:-/tmp/gd-train-slurm}
  NODES=()  # filled by write_config: the host itself
else
  BASE=${SLURM_LOCAL_BASE:-/tmp/gd-train-slurm-$NNODES}
  NODES=($(seq -f 'node%g' 1 "$NNODES"))
fi
NODE_CPUS=${SLURM_LOCAL_NODE_CPUS:-1}
CTLD_PORT_MULTI=24817   # multi-node cluster: 24817 slurmctld, 24818.. slurmd, 24900-24999 srun
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
MIN_JOB_AGE=${SLURM_LOCAL_MIN_JOB_AGE:-300}
KILL_WAIT=${SLURM_LOCAL_KILL_WAIT:-5}
PROCTRACK=${SLURM_LOCAL_PROCTRACK:-pgid}
CONF=$BASE/etc/slurm.conf
RUN=$BASE/run
MUNGE_PID_OURS=$RUN/munged.pid.ours
SELF=$(readlink -f "$0")
export SLURM_CONF=$CONF

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# pid_alive PIDFILE COMM -> prints pid and returns 0 if that pid runs COMM
pid_alive() {
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' < "$f")
  [ -n "$pid" ] && running "$pid" "$comm" || return 1
  echo "$pid"
}

# running PID COMM -> 0 if PID is alive (not a zombie) and runs COMM
running() {
  [ -r "/proc/$1/stat" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] \
    && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# stop_pid PIDFILE COMM : SIGTERM the pid in PIDFILE (if it runs COMM), wait for exit
stop_pid() {
  local f=$1 comm=$2 pid
  if pid=$(pid_alive "$f" "$comm"); then
    log "stopping $comm (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do running "$pid" "$comm" || break; sleep 0.25; done
    if running "$pid" "$comm"; then
      log "$comm (pid $pid) still alive after 15 s, sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

# proctrack/cgroup leaves empty /sys/fs/cgroup/<ctrl>/slurm_<host> dirs behind;
# remove them once slurmd is down (rmdir only succeeds on empty cgroups)
cleanup_cgroup_dirs() {
  local d
  for d in /sys/fs/cgroup/*/slurm_"$(hostname -s)"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

# the multi-node cluster's own munged (its key and socket; /etc/munge and /run/munge untouched)
MDIR=$BASE/munge
MSOCK=$MDIR/run/munge.socket
MPID=$MDIR/run/munged.pid

multi() { [ "$NNODES" -gt 1 ]; }

munge_works() {
  if multi; then
    command -v munge >/dev/null && munge -S "$MSOCK" -n 2>/dev/null | unmunge -S "$MSOCK" >/dev/null 2>&1
  else
    command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
  fi
}

# slurmd pid files: one per node on a multi-node cluster (SlurmdPidFile with %n)
slurmd_pidfiles() {
  local n
  if multi; then for n in "${NODES[@]}"; do echo "$RUN/slurmd.$n.pid"; done; else echo "$RUN/slurmd.pid"; fi
}

stop_slurmds() {
  local f
  for f in $(slurmd_pidfiles); do stop_pid "$f" slurmd; done
}

do_stop() {
  if pid_alive "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      log "cancelling remaining jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 40); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  stop_slurmds
  stop_pid "$RUN/slurmctld.pid" slurmctld
  cleanup_cgroup_dirs
  if multi; then
    stop_pid "$MPID" munged
  elif [ -f "$MUNGE_PID_OURS" ]; then
    stop_pid "$MUNGE_PID_OURS" munged
  else
    log "munged was not started by this script; leaving it running"
  fi
  log "stopped"
}

do_status() {
  local p
  if p=$(pid_alive "$RUN/slurmctld.pid" slurmctld); then echo "slurmctld: running (pid $p)"; else echo "slurmctld: not running"; fi
  for f in $(slurmd_pidfiles); do
    d=$(basename "$f" .pid)
    if p=$(pid_alive "$f" slurmd); then echo "$d: running (pid $p)"; else echo "$d: not running"; fi
  done
  if multi; then
    if munge_works; then echo "munged (own, $MSOCK): working (pid $(cat "$MPID" 2>/dev/null || echo '?'))"; else echo "munged (own): not working"; fi
  elif munge_works; then echo "munged: working (pid $(cat /run/munge/munged.pid 2>/dev/null || echo '?'))"; else echo "munged: not working"; fi
  if pid_alive "$RUN/slurmctld.pid" slurmctld >/dev/null; then sinfo; squeue; fi
}

install_if_missing() {
  local missing=0 c
  for c in slurmctld slurmd sbatch srun scontrol munged munge; do
    command -v "$c" >/dev/null 2>&1 || missing=1
  done
  ls /usr/lib/*/slurm-wlm/proctrack_"${PROCTRACK}".so >/dev/null 2>&1 || missing=1
  if [ $missing = 1 ]; then
    log "installing slurm-wlm munge (apt-get)"
    local t0=$SECONDS
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge; then
      apt-get update
      DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
    fi
    log "apt-get install took $((SECONDS - t0)) s"
  fi
}

start_private_munge() {
  if pid_alive "$MPID" munged >/dev/null && munge_works; then
    log "own munged already working ($MSOCK)"
    return
  fi
  stop_pid "$MPID" munged
  mkdir -p "$MDIR/key" "$MDIR/run"
  chown munge:munge "$MDIR" "$MDIR/key" "$MDIR/run"
  chmod 0755 "$MDIR" "$MDIR/run"
  chmod 0700 "$MDIR/key"
  if [ ! -s "$MDIR/key/munge.key" ]; then
    log "creating munge key $MDIR/key/munge.key"
    runuser -u munge -- mungekey --create --keyfile="$MDIR/key/munge.key"
  fi
  rm -f "$MSOCK" "$MSOCK.lock"
  log "starting own munged as user munge ($MSOCK)"
  runuser -u munge -- /usr/sbin/munged --socket="$MSOCK" --key-file="$MDIR/key/munge.key" \
    --pid-file="$MPID" --log-file="$MDIR/munged.log" --seed-file="$MDIR/munged.seed"
  for _ in $(seq 1 40); do munge_works && break; sleep 0.25; done
  munge_works || die "munged did not come up; see $MDIR/munged.log"
}

start_munge() {
  if multi; then start_private_munge; return; fi
  if munge_works; then
    log "munged already working"
    return
  fi
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    log "creating munge key $key"
    mkdir -p /etc/munge
    mungekey --create --keyfile="$key"
  fi
  # key/dir ownership and modes munged runs with (the Debian package creates
  # the key as munge:munge 0600; 0400 also works)
  chown munge:munge /etc/munge "$key"
  chmod 0700 /etc/munge
  chmod 0400 "$key"
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  # precaution: drop leftovers of a munged that died without cleaning up
  if [ -e /run/munge/munged.pid ] && ! pid_alive /run/munge/munged.pid munged >/dev/null; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  log "starting munged as user munge"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 40); do munge_works && break; sleep 0.25; done
  munge_works || die "munged did not come up; see /var/log/munge/munged.log"
  cp /run/munge/munged.pid "$MUNGE_PID_OURS"
}

write_config() {
  local host hw cpus boards spb cps tpc mem out
  host=$(hostname -s)
  # slurmd -C reports the hardware as slurmd sees it (works without a config)
  hw=$(slurmd -C 2>/dev/null | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  boards=$(sed -n 's/.* Boards=\([0-9]*\).*/\1/p' <<<"$hw")
  spb=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
  cps=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
  tpc=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not parse 'slurmd -C' output: $hw"
  mem=$(( mem * 85 / 100 ))   # 85% of what slurmd sees (24105 MB -> 20489 MB on the probe VM)
  mkdir -p "$BASE/etc" "$BASE/state" "$BASE/spool/slurmd" "$BASE/log" "$RUN"
  if multi; then
    local n
    # slurmd creates only the last level of its spool folder
    for n in "${NODES[@]}"; do mkdir -p "$BASE/spool/$n"; done
    out=$(multi_config "$host" $(( mem / NNODES )))
  else
  out=$(cat <<EOF
# generated by tests/slurm/local_cluster.sh - single-node local cluster
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool/slurmd
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# task/none + no cgroup accounting: works without cgroups (see SLURM_LOCAL_PROCTRACK)
ProctrackType=proctrack/${PROCTRACK}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
InactiveLimit=0
KillWait=${KILL_WAIT}
MinJobAge=${MIN_JOB_AGE}
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} Boards=${boards:-1} SocketsPerBoard=${spb:-1} CoresPerSocket=${cps:-$cpus} ThreadsPerCore=${tpc:-1} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
  fi
  if [ "$PROCTRACK" = cgroup ]; then
    printf 'CgroupPlugin=autodetect\n' > "$BASE/etc/cgroup.conf"
  else
    rm -f "$BASE/etc/cgroup.conf"
  fi
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$out" ]; then
    CONF_CHANGED=0
  else
    printf '%s\n' "$out" > "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF"
  fi
  multi || NODES=("$host")
}

# multi_config HOST MEM_PER_NODE: the N-node cluster's slurm.conf
multi_config() {
  local host=$1 mem=$2 i
  cat <<EOF
# generated by tests/slurm/local_cluster.sh - ${NNODES}-node local cluster (${NNODES} slurmd on ${host})
ClusterName=local${NNODES}
# A job's rendezvous port follows from its id (launch/rendezvous.py: 15000 + id % 15000), and this cluster's
# jobs run beside the one-node cluster's on this machine (pytest-xdist): ids 10000-14999, then from 10000
# again, put them on 25000-29999, apart from the one-node cluster's (ids from 1: 15001.., for its first
# 9999 jobs) and from this cluster's own ports (24817-24999).
FirstJobId=10000
MaxJobId=14999
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${CTLD_PORT_MULTI}
SlurmdPort=$((CTLD_PORT_MULTI + 1))
SrunPortRange=24900-24999
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MSOCK},cred_expire=${CRED_EXPIRE}
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool/%n
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd.%n.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/${PROCTRACK}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
# a killed slurmd is a failed node after ~SlurmdTimeout + SlurmdTimeout/3 + MessageTimeout (default 300)
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=${KILL_WAIT}
MinJobAge=${MIN_JOB_AGE}
EOF
  for i in $(seq 1 "$NNODES"); do
    echo "NodeName=node${i} NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((CTLD_PORT_MULTI + i)) CPUs=${NODE_CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${NODE_CPUS} ThreadsPerCore=1 RealMemory=${mem} State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=node[1-${NNODES}] Default=YES MaxTime=INFINITE State=UP"
}

start_daemons() {
  local restart=0 n
  if [ "${CONF_CHANGED}" = 1 ] || [ "${SLURM_LOCAL_CLEAN:-0}" = 1 ]; then restart=1; fi
  if [ $restart = 1 ]; then
    if pid_alive "$RUN/slurmctld.pid" slurmctld >/dev/null || any_slurmd_alive; then
      log "config changed or clean start requested: restarting daemons"
      stop_slurmds
      stop_pid "$RUN/slurmctld.pid" slurmctld
      cleanup_cgroup_dirs
    fi
  fi
  if [ "${SLURM_LOCAL_CLEAN:-0}" = 1 ]; then
    log "wiping $BASE/state and $BASE/spool"
    rm -rf "${BASE:?}/state/"* "${BASE:?}/spool/slurmd/"*
    if multi; then for n in "${NODES[@]}"; do rm -rf "${BASE:?}/spool/$n/"*; done; fi
  fi
  if pid_alive "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    log "slurmctld already running"
  else
    log "starting slurmctld"
    slurmctld -f "$CONF"
  fi
  if multi; then
    for n in "${NODES[@]}"; do
      if pid_alive "$RUN/slurmd.$n.pid" slurmd >/dev/null; then
        log "slurmd $n already running"
      else
        log "starting slurmd -N $n"
        [ "$SLURMD_STARTED_AT" = 0 ] && SLURMD_STARTED_AT=$(date +%s)  # the first one's: a lower bound for all
        slurmd -f "$CONF" -N "$n"
      fi
    done
  elif pid_alive "$RUN/slurmd.pid" slurmd >/dev/null; then
    log "slurmd already running"
  else
    log "starting slurmd"
    SLURMD_STARTED_AT=$(date +%s)
    slurmd -f "$CONF"
  fi
}

any_slurmd_alive() {
  local f
  for f in $(slurmd_pidfiles); do pid_alive "$f" slurmd >/dev/null && return 0; done
  return 1
}

# 0 once the slurmd we just started has registered with slurmctld (a restarted
# slurmctld reports the saved node state, e.g. idle, before slurmd registers)
slurmd_registered() {
  [ "${SLURMD_STARTED_AT:-0}" = 0 ] && return 0
  local sst
  sst=$(scontrol -o show node "$1" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
  [ -n "$sst" ] && [ "$(date -d "$sst" +%s 2>/dev/null || echo 0)" -ge $((SLURMD_STARTED_AT - 1)) ]
}

wait_node_idle() {
  local NODE=$1 st="" i resumed=0
  for i in $(seq 1 120); do
    st=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    slurmd_registered "$NODE" || st="unregistered($st)"
    case "$st" in
      idle) break ;;
      mixed|allocated|completing) log "node is $st (jobs from saved state are running)"; break ;;
      drained|draining|down|drained\*|down\*)
        if [ $resumed = 0 ] && [ $i -gt 8 ]; then
          log "node is $st ($(sinfo -h -R -o %E 2>/dev/null)); trying state=resume"
          scontrol update nodename="$NODE" state=resume 2>/dev/null || true
          resumed=1
        fi ;;
    esac
    sleep 0.5
  done
  case "$st" in
    idle|mixed|allocated|completing) ;;
    *) die "node $NODE not usable (state '$st'); see $BASE/log/slurmctld.log and $BASE/log/slurmd*.log" ;;
  esac
}

wait_idle() {
  local n
  for n in "${NODES[@]}"; do wait_node_idle "$n"; done
}

do_start() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  local t0=$SECONDS
  mkdir -p "$RUN"  # start_munge records the munged it starts here (the recipe created it later)
  install_if_missing
  start_munge
  CONF_CHANGED=0
  SLURMD_STARTED_AT=0
  write_config
  if [ "${SLURM_LOCAL_LINK_ETC:-0}" = 1 ]; then
    mkdir -p /etc/slurm
    ln -sfn "$CONF" /etc/slurm/slurm.conf
    log "linked /etc/slurm/slurm.conf -> $CONF"
  fi
  start_daemons
  wait_idle
  sinfo
  cat <<EOF

Local SLURM is up ($((SECONDS - t0)) s). Node(s): ${NODES[*]}
  export SLURM_CONF=$CONF
  sbatch --wait job.sh ; squeue ; scontrol show job <id>
Logs:  $BASE/log/slurmctld.log  $BASE/log/slurmd*.log
Stop:  $( multi && echo "SLURM_LOCAL_NODES=$NNODES ")$SELF stop
EOF
}

case "${1:-start}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
