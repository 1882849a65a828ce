# Sourced by the Slurm scripts after they start their command in the background:
# passes a preemption warning (SIGUSR1 from `--signal=B:USR1@T`, or SIGTERM) on
# with `forward_signal` (default: SIGUSR1 to the command; a script may define its
# own first), waits for the command, and requeues this job when it stopped for
# preemption: it exited 75 (labelgen.stopping.PREEMPTED_EXIT:
# everything finished is kept, the same command resumes), or a warning came and it
# did not finish (a command that ended with 0 as the warning came is done). An array task requeues
# itself only (ARRAYJOB_TASK): the last task's SLURM_JOB_ID is the array's own id,
# and requeueing that id requeues every task of the array.
pid=$!
declare -F forward_signal >/dev/null || forward_signal() { kill -USR1 "$pid" 2>/dev/null; }
preempted=0
trap 'preempted=1; forward_signal' USR1 TERM
rc=0
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
    rc=$?
done
if [ "$rc" -gt 128 ]; then   # the last wait was cut by the warning: the command's own status is still to be had
    wait "$pid" 2>/dev/null
    status=$?
    [ "$status" -ne 127 ] && rc=$status
fi
# A command that finished (exit 0) when the warning came has nothing left to do: no requeue.
if { [ "$rc" -eq 75 ] || { [ "$preempted" -eq 1 ] && [ "$rc" -ne 0 ]; }; } && [ -n "${SLURM_JOB_ID:-}" ]; then
    me=${SLURM_ARRAY_TASK_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    echo "stopped for preemption (exit $rc): requeueing job ${me:-$SLURM_JOB_ID}" >&2
    scontrol requeue "${me:-$SLURM_JOB_ID}"
fi
exit "$rc"
