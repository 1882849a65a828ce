#!/usr/bin/env bash
# A real single-node Slurm for the test suite (or for trying the job scripts on a laptop): writes a minimal
# slurm.conf for this host under STATE_DIR, starts munged, slurmctld and slurmd there (as root, on ports of
# their own), waits until the node is idle, and prints the environment that points Slurm's commands at it.
# Stop it with jobs/testing/slurm-down.sh STATE_DIR (by the daemons' pid files).
#
#   eval "$(bash jobs/testing/slurm-up.sh /tmp/slurm)"     # then sbatch, squeue, scontrol ... talk to it
#
# Two partitions: "batch" (the default) and "urgent", whose higher PriorityTier preempts batch jobs with a
# requeue (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE), as a cluster's preemption does.
set -euo pipefail
STATE=$(mkdir -p "${1:?usage: slurm-up.sh STATE_DIR}" && cd "$1" && pwd)
for bin in munged slurmctld slurmd sbatch; do
    command -v "$bin" >/dev/null || { echo "slurm-up.sh: $bin not found; install Debian's slurm-wlm and munge" >&2; exit 3; }
done
HOST=$(hostname -s)
CPUS=$(nproc --all)   # every core: nproc alone obeys OMP_NUM_THREADS (1 in a pytest-xdist worker)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(port)
SLURMD_PORT=$(port)
mkdir -p "$STATE/spool" "$STATE/state" "$STATE/log" "$STATE/munge"
chmod 700 "$STATE/munge"
[ -f "$STATE/munge/munge.key" ] || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.sock" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
cat > "$STATE/slurm.conf" <<EOF
ClusterName=labelgen-test
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=30
MinJobAge=600
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=batch Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
export SLURM_CONF="$STATE/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 300); do
    [ "$(sinfo -h -n "$HOST" -o %T 2>/dev/null)" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.2
done
echo "slurm-up.sh: the node did not come up idle in 60 s; see $STATE/log" >&2
exit 1
