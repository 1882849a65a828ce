"""Generation runs that are stopped (Ctrl-C, SIGTERM), run out of disk, or meet
a second run on the same output: each ends promptly with one line, leaves no
manifest, and resumes; a second run is refused at once. The runs are real
`labelgen` processes; waits are bounded by polling, never asserted on time."""

import json
import os
import re
import signal
import time
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import slow_teacher, wait_for
from labelgen.tools.inspection import validate


def big_corpus(path: Path, docs: int = 200) -> Path:
    from labelgen.tools.demo import read_corpus
    text = "\n".join(read_corpus(None, 2_000_000))
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"id": f"d{i}", "text": text[i * 3000:(i + 1) * 3000]}) + "\n")
    return path


def labelgen(*args: str, prelude: str = "") -> subprocess.Popen:
    """`labelgen ARGS` as its own process (after `prelude`, Python run first in it), with Ctrl-C's SIGINT
    handled as in a terminal: a test run started in the background by a non-interactive shell (`make test &`,
    a CI runner) passes SIGINT on ignored, and Python then leaves it ignored -- the job ran to the end, exit 0."""
    code = (f"{prelude}\nimport signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from labelgen.cli import app\nsys.argv = ['labelgen', *sys.argv[1:]]\napp()")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})




def ended(proc: subprocess.Popen, limit: float = 120) -> tuple[int, str]:
    """The exit code and stderr of a process that must end on its own; a
    hang is killed and fails the test (the limit is far above the seconds
    a stop takes, so a busy machine does not trip it)."""
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running {limit:.0f} s after it was told to stop: hung")
    return proc.returncode, err


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.parquet"))


def generate_args(teacher: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--teacher", teacher, "--input", str(corpus), "--out", str(out), "--k", "8",
            "--max-seq-len", "64", "--rows-per-shard", "8", "--no-progress", "--device", "cpu", *extra]


SLOW_TEACHER = slow_teacher(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_ctrl_c_stops_generation_within_seconds_and_resume_continues(tiny_teacher, tmp_path, sig):
    """Ctrl-C exits 130; a preemption signal (SIGTERM, SIGUSR1) exits 75, which job scripts requeue on."""
    corpus, out = big_corpus(tmp_path / "docs.jsonl"), tmp_path / "out"
    proc = labelgen(*generate_args(tiny_teacher, corpus, out), prelude=SLOW_TEACHER)
    wait_for(lambda: len(shards(out)) >= 2, proc)
    proc.send_signal(sig)
    code, err = ended(proc)
    name = signal.Signals(sig).name
    assert code == (130 if sig == signal.SIGINT else 75), err
    assert f"labelgen: stopped by {name}; finished shards are kept" in err and "Traceback" not in err, err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    kept = len(shards(out))
    assert 2 <= kept < 25
    code, err = ended(labelgen(*generate_args(tiny_teacher, corpus, out, "--resume")), 600)
    assert code == 0, err
    report = validate(out)
    assert report["ok"] and report["rows"] >= 200, report["problems"]
    assert json.loads((out / "manifest.json").read_text())["counts"]["examples"] == 200


FULL_DISK = """
import errno
from labelgen import shards
_write, calls = shards.ShardFile.write, [0]
def write(self, row):
    calls[0] += 1
    if calls[0] > 60:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
    _write(self, row)
shards.ShardFile.write = write
"""


@pytest.mark.slow
def test_a_full_disk_ends_generation_with_one_line_no_manifest_and_a_working_resume(tiny_teacher, tmp_path):
    corpus, out = big_corpus(tmp_path / "docs.jsonl", docs=60), tmp_path / "out"
    code, err = ended(labelgen(*generate_args(tiny_teacher, corpus, out), prelude=FULL_DISK))
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.startswith("labelgen:")]
    assert len(lines) == 1 and lines[0].endswith("No space left on device") and ".tmp" in lines[0], err
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    code, err = ended(labelgen(*generate_args(tiny_teacher, corpus, out, "--resume")), 600)
    assert code == 0, err
    assert validate(out)["ok"]


@pytest.mark.slow
def test_a_second_run_on_the_same_label_set_is_refused_naming_the_first(tiny_teacher, tmp_path):
    corpus, out = big_corpus(tmp_path / "docs.jsonl", docs=120), tmp_path / "out"
    first = labelgen(*generate_args(tiny_teacher, corpus, out))
    wait_for(lambda: (out / "run.json").is_file(), first)
    os.kill(first.pid, signal.SIGSTOP)   # still holding the set however fast it would have finished
    try:
        second = labelgen(*generate_args(tiny_teacher, corpus, out, "--k", "4", "--overwrite"))
        code, err = ended(second)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 2 and f"in use by another labelgen run (pid {first.pid} on " in err, err
    code, err = ended(first, 600)
    assert code == 0, err
    report = validate(out)
    assert report["ok"] and report["rows"] >= 120, report["problems"]
    assert json.loads((out / "manifest.json").read_text())["k"] == 8


def test_a_lock_left_by_a_killed_run_does_not_block_a_resume(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom labelgen.store import fsutil\n"
                               "with fsutil.run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from labelgen.store.fsutil import run_lock
    from labelgen.errors import InUse
    with pytest.raises(InUse, match=rf"in use by another labelgen run \(pid {holder.pid} on "):
        with run_lock(out):
            pass
    holder.kill()
    holder.wait()
    with run_lock(out):   # the kernel dropped the dead holder's lock
        pass


def test_finalize_and_a_second_copy_of_a_worker_are_refused_while_a_worker_runs(tmp_path):
    from labelgen.store.fsutil import run_lock
    from labelgen.errors import InUse
    from labelgen.generate.finalize import finalize
    with run_lock(tmp_path, (0, 2)):
        with run_lock(tmp_path, (1, 2)):   # the other worker of the run shares the directory
            pass
        with pytest.raises(InUse, match=r"worker 0 of 2\): in use by another labelgen run"):
            with run_lock(tmp_path, (0, 2)):
                pass
        with pytest.raises(InUse, match="in use by another labelgen run"):
            finalize(tmp_path)


@pytest.mark.slow
def test_an_import_stopped_by_sigterm_keeps_nothing_and_the_same_command_then_completes(tiny_teacher, tmp_path):
    K = 8
    import numpy as np
    rng = np.random.default_rng(0)
    with open(tmp_path / "big.jsonl", "w") as f:
        for n in range(3000):
            ids = rng.integers(0, 512, 40).tolist()
            plp = [None] + [{str(t): {"logprob": float(-1.0 - r), "rank": r + 1}
                             for r, t in enumerate(dict.fromkeys([ids[i], *rng.permutation(512)[:K].tolist()]))}
                            for i in range(1, 40)]
            f.write(json.dumps({"prompt_token_ids": ids, "prompt_logprobs": plp}) + "\n")
    args = ["import", str(tmp_path / "big.jsonl"), "--tokenizer", tiny_teacher, "--k", str(K), "--out",
            str(tmp_path / "l"), "--rows-per-shard", "100"]
    proc = labelgen(*args)
    wait_for(lambda: len(shards(tmp_path / "l")) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    code, err = ended(proc)
    assert code == 75 and "labelgen: stopped by SIGTERM; nothing was kept" in err and "Traceback" not in err, err
    assert not (tmp_path / "l").exists()
    code, err = ended(labelgen(*args), 600)
    assert code == 0, err
    assert validate(tmp_path / "l")["rows"] == 3000


def test_an_import_into_a_label_set_another_run_holds_is_refused(tiny_teacher, tmp_path):
    from typer.testing import CliRunner
    from labelgen.cli import app
    from labelgen.store.fsutil import run_lock
    (tmp_path / "x.jsonl").write_text("{}\n")
    with run_lock(tmp_path / "l"):
        r = CliRunner().invoke(app, ["import", str(tmp_path / "x.jsonl"), "--tokenizer", tiny_teacher, "--k", "4",
                                     "--out", str(tmp_path / "l")])
    assert r.exit_code == 2 and "in use by another labelgen run" in r.output, r.output


def student_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "student_train.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preempted_training_run_checkpoints_exits_75_and_the_same_command_resumes_to_the_same_losses(
        topk_labels, student_config, tmp_path, sig):
    def args(out):
        return ["train", "--labels", str(topk_labels), "--student-config", student_config, "--out", str(out),
                "--max-steps", "300", "--batch-size", "2", "--log-every", "1", "--save-every", "0", "--no-progress",
                "--device", "cpu", "--resume"]
    straight = student_train(*args(tmp_path / "straight"))
    proc = student_train(*args(tmp_path / "stopped"))
    wait_for(lambda: len(logged_steps(tmp_path / "stopped")) >= 5, proc)
    proc.send_signal(sig)
    code, err = ended(proc)
    assert code == 75, err
    at = int(re.search(r"stopped by (SIGTERM|SIGUSR1) after step (\d+), which is checkpointed", err).group(2))
    assert 5 <= at < 300 and (tmp_path / "stopped" / f"step_{at:06d}").is_dir(), err
    code, err = ended(student_train(*args(tmp_path / "stopped")), 900)
    assert code == 0, err
    code, err = ended(straight, 900)
    assert code == 0, err
    a, b = logged_steps(tmp_path / "straight"), logged_steps(tmp_path / "stopped")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 301))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_checkpointed_step(topk_labels, student_config, tmp_path):
    """torchrun passes SIGTERM to its workers; the ranks agree to stop after the same step and save it."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             "29537", "-m", "student_train.cli", "train", "--labels", str(topk_labels),
                             "--student-config", student_config, "--out", str(out), "--max-steps", "100000",
                             "--batch-size", "2", "--log-every", "1", "--save-every", "0", "--no-progress",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(lambda: len(logged_steps(out)) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = ended(proc)
    steps = set(map(int, re.findall(r"stopped by SIGTERM after step (\d+), which is checkpointed", err)))
    assert len(steps) == 1, err[-3000:]   # both ranks, one step
    assert (out / f"step_{steps.pop():06d}" / "meta.json").is_file()


@pytest.mark.slow
def test_the_slurm_array_script_forwards_the_warning_signal_and_requeues_on_preemption(tiny_teacher, tmp_path):
    """jobs/generate_slurm_array.sh as Slurm runs it (sbatch --signal=B:USR1 signals the script itself),
    with a stand-in scontrol that records what it is asked."""
    root = Path(__file__).resolve().parents[1]
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (shims / "scontrol").chmod(0o755)
    corpus, out = big_corpus(tmp_path / "docs.jsonl"), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242",
           "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = subprocess.Popen(["bash", str(root / "jobs" / "generate_slurm_array.sh"), tiny_teacher, str(corpus),
                               str(out), "--backend", "hf", "--k", "8", "--max-seq-len", "64", "--rows-per-shard", "8",
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: len(shards(out)) >= 2, script)
    script.send_signal(signal.SIGUSR1)
    code, err = ended(script)
    assert code == 75 and "labelgen: stopped by SIGUSR1; finished shards are kept" in err, err
    asked = (tmp_path / "scontrol.log").read_text().splitlines()   # where the submitted script lies, then the requeue
    assert [line for line in asked if line.startswith("requeue")] == ["requeue 4242"], asked
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("command_exit, requeued", [(0, False), (3, True), (75, True)])
def test_a_warning_to_a_command_that_then_finishes_does_not_requeue_it(tmp_path, command_exit, requeued):
    """jobs/requeue.sh with a command that ignores the warning and ends on its own: done (0) is not requeued (the
    interrupted wait's 138 used to be taken for its status), a failure after a warning is, and 75 always is; the
    script exits with the command's own status."""
    root = Path(__file__).resolve().parents[1]
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (shims / "scontrol").chmod(0o755)
    ready = tmp_path / "ready"
    job = (f"bash -c 'trap \"\" USR1; touch {ready}; sleep 2; exit {command_exit}' &\n"
           f"forward_signal() {{ :; }}\nsource {root / 'jobs' / 'requeue.sh'}\n")
    script = subprocess.Popen(["bash", "-c", job], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{shims}:{os.environ['PATH']}"})
    wait_for(ready.exists, script)
    time.sleep(0.3)   # inside requeue.sh's wait by now
    script.send_signal(signal.SIGUSR1)
    code, err = ended(script)
    assert code == command_exit, err
    log = tmp_path / "scontrol.log"
    asked = log.read_text().splitlines() if log.exists() else []
    assert asked == (["requeue 4242"] if requeued else []), (asked, err)
