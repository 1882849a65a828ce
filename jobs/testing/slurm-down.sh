#!/usr/bin/env bash
# Stops what jobs/testing/slurm-up.sh STATE_DIR started: its jobs, slurmd, slurmctld and munged (by pid file).
set -uo pipefail
STATE=${1:?usage: slurm-down.sh STATE_DIR}
export SLURM_CONF="$STATE/slurm.conf"
scancel --full --quiet --user="$(id -un)" 2>/dev/null
for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
done
for _ in $(seq 50); do
    alive=0
    for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
        [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null && alive=1
    done
    [ "$alive" -eq 0 ] && exit 0
    sleep 0.2
done
exit 0
