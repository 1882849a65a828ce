"""The Slurm scripts under a real single-node Slurm (jobs/testing/slurm-up.sh:
Debian's slurm-wlm and munge, started as root on ports of their own),
submitted as a user submits them, from outside the repository: an array
equals one process; a warned task exits 75, requeues itself alone through
the real `scontrol requeue` and resumes; a cancelled task is resubmitted
from `finalize --missing`; a time limit's warning stops and requeues;
train_slurm.sh's two torchrun processes checkpoint, requeue and resume to
the losses of an uninterrupted run. Elsewhere the module skips, saying what
to install."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
CPU = ("--gpus-per-task=0", "--cpus-per-task=1")   # the scripts' GPU defaults, overridden as on a CPU node
FLAGS = ("--k", "8", "--max-seq-len", "64", "--device", "cpu")
REQUEUE_HOLD = 120   # seconds Slurm 22.05 holds a requeued job (its StartTime): checked below, in docs/generation.md

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs a Slurm ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("runs slurmctld and slurmd as root (jobs/testing/slurm-up.sh)")
    state = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(JOBS / "testing" / "slurm-up.sh"), str(state)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    yield env
    subprocess.run(["bash", str(JOBS / "testing" / "slurm-down.sh"), str(state)], capture_output=True)


def slurm_cmd(env, *args: str, cwd=None) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
    return r.stdout.strip()


def sbatch(env, cwd: Path, *args: str) -> str:
    return slurm_cmd(env, "sbatch", "--parsable", *args, cwd=cwd).split(";")[0]


def tasks(env, job: str) -> dict[str, dict]:
    """Each task (or the job) of `job` as scontrol shows it: {"0": {"JobState": ..., "Restarts": ...}, ...}
    (every job read, then this one's records kept: `scontrol show job ID` of an array shows either all its tasks
    or only the last, whose job id is the array's)."""
    r = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, env=env)
    out = {}
    for line in r.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if job in (fields.get("ArrayJobId"), fields.get("JobId")):
            out[fields.get("ArrayTaskId", "job")] = fields
    return out


def wait_for(condition, limit: float, what: str):
    end = time.monotonic() + limit
    while not (value := condition()):
        assert time.monotonic() < end, f"{what}: not within {limit:.0f} s"
        time.sleep(0.5)
    return value


def finished(env, job: str, expedite: bool = True, limit: float = 900) -> dict[str, dict]:
    """The tasks of `job` once all have ended; a requeued task held for its BeginTime is released at once
    (`expedite`), so a test does not wait Slurm's two minutes each time."""
    def ended():
        now = tasks(env, job)
        for task, fields in now.items():
            if expedite and fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job}" + (f"_{task}" if task != "job" else ""),
                                "StartTime=now"], env=env, capture_output=True)
        states = {f.get("JobState") for f in now.values()}
        return now if now and states <= {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"} else None
    return wait_for(ended, limit, f"job {job} to end")


def label_rows(where) -> list[dict]:
    from labelgen.shards import ShardReader
    return [{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
            for r in ShardReader(where).rows()]


def single_run(teacher: str, inputs: Path, out: Path, rows_per_shard: int, **kw) -> list[dict]:
    from labelgen.generate import GenerateConfig, run
    run(GenerateConfig(teacher=teacher, inputs=(str(inputs),), out=str(out), k=8, max_seq_len=64,
                       rows_per_shard=rows_per_shard, progress=False, device="cpu", **kw))
    return label_rows(out)


def labelgen(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labelgen.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory):
    """12 documents of ~10 windows of 64 tokens each (~120 in all; a shard each, SLOW): one window per teacher
    step under `slowed`."""
    from labelgen.tools.demo import read_corpus
    text = "\n".join(read_corpus(None, 3_000_000))
    path = tmp_path_factory.mktemp("slow") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"d{i}", "text": text[i * 1100:(i + 1) * 1100]}) + "\n")
    return path


@pytest.fixture(scope="module")
def slowed(slurm, tmp_path_factory):
    """The Slurm environment with a `labelgen` first on PATH whose hf teacher sleeps 0.3 s a batch: with one
    window a batch (SLOW), a task lasts as many 0.3 s as it has windows, however fast the machine, so a test
    knows it is still running when warned, and how many allocations it needs."""
    from helpers import slow_teacher
    d = tmp_path_factory.mktemp("slowed_bin")
    (d / "labelgen").write_text(f"#!{sys.executable}\n{slow_teacher(0.3)}\nimport sys\nfrom labelgen.cli import app\n"
                                "sys.argv[0] = 'labelgen'\napp()\n")
    (d / "labelgen").chmod(0o755)
    return {**slurm, "PATH": f"{d}{os.pathsep}{slurm['PATH']}"}


SLOW = ("--rows-per-shard", "1", "--batch-tokens", "64")


def test_an_array_submitted_from_anywhere_equals_one_process(slurm, tiny_teacher, corpus, tmp_path):
    out = tmp_path / "array"
    job = sbatch(slurm, tmp_path, "--array=0-3", *CPU, str(JOBS / "generate_slurm_array.sh"), tiny_teacher,
                 str(corpus / "docs.jsonl"), str(out), *FLAGS, "--rows-per-shard", "2")
    done = finished(slurm, job)
    logs = {t: (tmp_path / f"labelgen-{job}_{t}.out").read_text() for t in done}
    assert all(f["JobState"] == "COMPLETED" for f in done.values()), logs
    r = labelgen(slurm, "finalize", str(out))
    assert r.returncode == 0, r.stderr
    assert label_rows(out) == single_run(tiny_teacher, corpus / "docs.jsonl", tmp_path / "one", 2)


def test_a_warned_task_exits_75_requeues_itself_alone_and_the_set_is_unchanged(slowed, tiny_teacher, slow_corpus,
                                                                               tmp_path):
    """Task 1 is the array's last: its SLURM_JOB_ID is the array's own id, and requeueing that id would requeue
    (cancel) task 0 too. It is warned as Slurm warns before preemption or a time limit (USR1 to the batch
    shell); only it requeues, Slurm holds it about two minutes (its StartTime, read, not waited for: the test
    then releases it), it resumes from its own shards."""
    from datetime import datetime
    slurm = slowed
    out = tmp_path / "pre"
    job = sbatch(slurm, tmp_path, "--array=0-1", *CPU, str(JOBS / "generate_slurm_array.sh"), tiny_teacher,
                 str(slow_corpus), str(out), *FLAGS, *SLOW)
    wait_for(lambda: list(out.glob("shard-00000[13579].parquet")), 600, "task 1's first shard")
    assert tasks(slurm, job).get("1", {}).get("JobState") == "RUNNING", "task 1 ended before it could be warned"
    slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", f"{job}_1")
    warned = time.time()
    held = wait_for(lambda: (t := tasks(slurm, job).get("1", {})).get("Reason") == "BeginTime" and t, 300,
                    "task 1 requeued")
    hold = datetime.fromisoformat(held["StartTime"]).timestamp() - warned
    print(f"\nrequeued task held until {hold:.0f} s after its warning")
    assert REQUEUE_HOLD - 10 < hold < REQUEUE_HOLD + 60, hold
    done = finished(slurm, job)
    log = (tmp_path / f"labelgen-{job}_1.out").read_text()
    assert (done["0"]["JobState"], done["0"]["Restarts"]) == ("COMPLETED", "0"), done["0"]   # never cancelled
    assert (done["1"]["JobState"], done["1"]["Restarts"]) == ("COMPLETED", "1"), log
    assert "labelgen: stopped by SIGUSR1" in log and f"requeueing job {job}_1" in log, log
    assert labelgen(slurm, "finalize", str(out)).returncode == 0
    assert label_rows(out) == single_run(tiny_teacher, slow_corpus, tmp_path / "one", 1, batch_tokens=64)


def test_a_cancelled_task_is_resubmitted_from_finalize_missing(slurm, tiny_teacher, corpus, tmp_path):
    out = tmp_path / "cut"
    args = (*CPU, str(JOBS / "generate_slurm_array.sh"), tiny_teacher, str(corpus / "docs.jsonl"), str(out), *FLAGS,
            "--rows-per-shard", "2")
    job = sbatch(slurm, tmp_path, "--array=0-2", *args)
    slurm_cmd(slurm, "scancel", f"{job}_2")   # two CPUs: task 2 waits for one, and is cancelled first
    done = finished(slurm, job)   # a task cancelled before it ran leaves no record of its own
    assert {t: f["JobState"] for t, f in done.items() if t != "2"} == {"0": "COMPLETED", "1": "COMPLETED"}, done
    assert done.get("2", {}).get("JobState", "CANCELLED") == "CANCELLED", done
    r = labelgen(slurm, "finalize", str(out), "--missing")
    assert r.returncode == 0 and r.stdout.strip() == "2", (r.stdout, r.stderr)
    again = sbatch(slurm, tmp_path, f"--array={r.stdout.strip()}", *args)
    assert [f["JobState"] for f in finished(slurm, again).values()] == ["COMPLETED"]
    assert labelgen(slurm, "finalize", str(out), "--missing").stdout.strip() == ""
    assert labelgen(slurm, "finalize", str(out)).returncode == 0
    assert label_rows(out) == single_run(tiny_teacher, corpus / "docs.jsonl", tmp_path / "one", 2)


def test_a_time_limit_warning_stops_the_task_and_it_requeues_until_done(slowed, tiny_teacher, slow_corpus, tmp_path):
    """~120 windows at 0.3 s: the first minute-long allocation is warned 30 s in, the second finishes."""
    slurm = slowed
    out = tmp_path / "limit"
    job = sbatch(slurm, tmp_path, "--time=1", "--signal=B:USR1@30", *CPU, str(JOBS / "generate_slurm_array.sh"),
                 tiny_teacher, str(slow_corpus), str(out), *FLAGS, *SLOW)
    done = finished(slurm, job)["job"]
    log = (tmp_path / f"labelgen-{job}_4294967294.out")
    log = log if log.exists() else next(tmp_path.glob(f"labelgen-{job}*.out"))
    text = log.read_text()
    assert done["JobState"] == "COMPLETED" and int(done["Restarts"]) >= 1, text
    assert "labelgen: stopped by SIGUSR1" in text and f"requeueing job {job}" in text, text
    assert label_rows(out) == single_run(tiny_teacher, slow_corpus, tmp_path / "one", 1, batch_tokens=64)


def test_train_slurm_warned_checkpoints_requeues_and_resumes_to_the_uninterrupted_losses(slurm, topk_labels,
                                                                                        student_config, tmp_path):
    from helpers import torchrun_student_train
    args = ("--labels", str(topk_labels), "--student-config", student_config, "--max-steps", "100", "--batch-size", "2",
            "--save-every", "100", "--log-every", "1", "--eval-every", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = sbatch(slurm, tmp_path, "--gpus-per-node=0", "--cpus-per-task=2", f"--export=ALL,GPUS_PER_NODE=2,MASTER_PORT={port}",
                 str(JOBS / "train_slurm.sh"), *args, "--out", str(tmp_path / "slurm"), "--no-progress", "--device", "cpu")
    metrics = tmp_path / "slurm" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 600, "five steps")
    slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", job)
    done = finished(slurm, job)["job"]
    log = (tmp_path / f"student-train-{job}.out").read_text()
    assert done["JobState"] == "COMPLETED" and done["Restarts"] == "1", log
    assert re.search(r"student-train: stopped by SIGTERM after step \d+, which is checkpointed", log), log
    torchrun_student_train(port + 1, "train", *args, "--out", str(tmp_path / "straight"))
    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    resumed, straight = losses(tmp_path / "slurm"), losses(tmp_path / "straight")
    assert [s for s, _ in resumed] == [s for s, _ in straight] == list(range(1, 101))
    assert [l for _, l in resumed] == pytest.approx([l for _, l in straight], rel=1e-5)


def test_the_readme_cluster_recipe_runs_as_written(slurm, tiny_teacher, corpus, tmp_path):
    """README.md's "On a GPU cluster" block, run by bash under the real Slurm as a user would paste it: the
    teacher, corpus and bucket swapped for a tiny teacher, a corpus file and a directory, FLAGS for a CPU node's,
    the scripts' GPU defaults overridden, 2 tasks instead of 64. The dry run, the array and the finalize that
    waits for it (--dependency=afterok) leave a complete set equal to one process; --missing then says so."""
    block = (ROOT / "README.md").read_text().split("## On a GPU cluster")[1].split("```bash\n")[1].split("```")[0]
    out = tmp_path / "labels"
    swap = {"/models/qwen2.5-7b": tiny_teacher, "corpus/": str(corpus / "docs.jsonl"), "s3://bucket/labels": str(out),
            "jobs/generate_slurm_array.sh": str(JOBS / "generate_slurm_array.sh"), "--array=0-63": "--array=0-1",
            "sbatch ": "sbatch " + " ".join(CPU) + " "}
    lines = []
    for line in block.splitlines():
        if line.startswith("hf download") or "--missing" in line:   # the teacher is on disk; --missing: below
            continue
        if line.startswith("FLAGS="):
            line = f'FLAGS="{" ".join(FLAGS)} --rows-per-shard 2"'
        for a, b in swap.items():
            line = line.replace(a, b)
        lines.append(line)
    assert any("--dry-run" in line for line in lines) and any("--dependency=afterok:$jid" in line for line in lines)
    (tmp_path / "recipe.sh").write_text("set -euo pipefail\n" + "\n".join(lines) + "\necho \"array $jid\"\n")
    r = subprocess.run(["bash", str(tmp_path / "recipe.sh")], capture_output=True, text=True, env=slurm, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout[:r.stdout.index("\n}") + 2])["num_workers"] == 1   # the dry run's config, first
    job = re.search(r"^array (\d+)$", r.stdout, re.M).group(1)
    wait_for(lambda: (out / "manifest.json").is_file(), 900, "the finalize job")
    assert all(f["JobState"] == "COMPLETED" for f in finished(slurm, job).values())
    assert label_rows(out) == single_run(tiny_teacher, corpus / "docs.jsonl", tmp_path / "one", 2)
    assert sorted(p.name for p in tmp_path.glob("labelgen-*.out")) == [f"labelgen-{job}_{t}.out" for t in (0, 1)]
    r = labelgen(slurm, "finalize", str(out), "--missing")
    assert r.returncode == 0 and r.stdout == "" and "0 of 2 workers have not finished" in r.stderr, r.stderr
