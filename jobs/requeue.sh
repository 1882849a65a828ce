# Sourced by the Slurm scripts after they start their command in the background:
# forwards a preemption signal (SIGUSR1 from `--signal=B:USR1@T`, SIGTERM) to it,
# waits for it, and requeues the job when it stopped for preemption (exit 75,
# labelgen.stopping.PREEMPTED_EXIT: everything finished is kept, the same command resumes).
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null' USR1 TERM
rc=0
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
    rc=$?
done
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "stopped for preemption: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
