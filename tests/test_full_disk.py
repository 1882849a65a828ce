"""A full disk: while a shard is written (the error names the shard), at a
checkpoint (one line, no half checkpoint, resume works), and a filesystem
that fills mid-checkpoint (the last checkpoint kept)."""

import json
import re
import subprocess
import sys

import pytest
from helpers import one_line_error

FULL_DISK_AT_WRITE = """
import errno
from labelgen.store import fsutil
_create, written = fsutil.create_fresh, [0]
class Full:
    def __init__(self, f): self.f = f
    def write(self, data):
        written[0] += len(data)
        if written[0] > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")   # as the system says it: no file named
        return self.f.write(data)
    def __getattr__(self, name): return getattr(self.f, name)
fsutil.create_fresh = lambda path, text=False: (Full(_create(path, text)) if str(path).endswith(".parquet.tmp")
                                                else _create(path, text))
"""


def test_a_full_disk_while_a_shard_is_written_names_the_shard(tiny_teacher, corpus, tmp_path):
    code = FULL_DISK_AT_WRITE + "\nimport sys\nfrom labelgen.cli import app\nsys.argv = ['labelgen', *sys.argv[1:]]\napp()"
    r = subprocess.run([sys.executable, "-c", code, "generate", "--teacher", tiny_teacher, "--input",
                        str(corpus / "docs.jsonl"), "--out", str(tmp_path / "l"), "--k", "16", "--max-seq-len", "64",
                        "--rows-per-shard", "6", "--no-progress", "--device", "cpu"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "labelgen")
    assert re.search(r"shard-\d+\.parquet\.tmp: No space left on device$", line), line
    assert not (tmp_path / "l" / "manifest.json").exists() and not list((tmp_path / "l").glob("*.tmp"))


FULL_DISK_AT_CHECKPOINT = """
import collections, shutil, torch
from student_train import checkpoint
_save, calls = torch.save, [0]
def save(obj, f, *a, **kw):
    calls[0] += 1
    if calls[0] > 2:   # the second checkpoint's optimizer state: torch's zip writer on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3008 vs 2900")
    return _save(obj, f, *a, **kw)
checkpoint.torch.save = save
shutil.disk_usage = lambda path: collections.namedtuple("u", "total used free")(1 << 30, 1 << 30, 0)
"""


def test_a_full_disk_at_a_checkpoint_is_one_line_leaves_no_half_checkpoint_and_resume_works(topk_labels,
                                                                                          student_config, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--labels", str(topk_labels), "--student-config", student_config, "--out", str(out),
            "--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--warmup-steps", "1", "--no-progress",
            "--device", "cpu"]
    code = FULL_DISK_AT_CHECKPOINT + "\nimport sys\nfrom student_train.cli import app\nsys.argv = ['student-train', *sys.argv[1:]]\napp()"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "student-train")
    assert "step_000004: cannot write the checkpoint (no space left on device)" in line, line
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step_000002"]   # no half checkpoint
    r = subprocess.run([sys.executable, "-m", "student_train.cli", *args, "--resume"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "step_000004" / "meta.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1.4 MB: one checkpoint of the conftest student fits (944 KB: weights, AdamW state, tokenizer),
    two do not (root only; elsewhere the test skips, saying so)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"a small filesystem needs root (mount -t tmpfs): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_training_into_a_filesystem_that_fills_mid_checkpoint_keeps_the_last_and_resumes(small_disk, topk_labels,
                                                                                        student_config, tmp_path):
    cmd = [sys.executable, "-m", "student_train.cli", "train", "--labels", str(topk_labels), "--student-config",
           student_config, "--out", str(small_disk / "run"), "--max-steps", "4", "--batch-size", "2",
           "--save-every", "2", "--log-every", "1", "--eval-every", "0", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)   # one checkpoint fits, two do not
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "student-train")
    assert "step_000004: cannot write the checkpoint (no space left on device)" in line, line
    names = sorted(p.name for p in (small_disk / "run").iterdir())
    assert "step_000002" in names and not any(n.startswith(".step") or n == "step_000004" for n in names), names
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(small_disk / "run" / "step_000002").num_parameters() > 0
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)   # room made
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["step"] for line in (small_disk / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
