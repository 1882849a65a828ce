"""Hardening, round 3 (in part): what an unlucky or hostile user met on the
new surfaces: a Ray address with nothing behind it, a shard whose row count
the manifest misstates, a full disk during generation or a checkpoint, a
JSON key repeated in an imported record, rounds' --skip-bad."""

import json
import os
import re
import shutil
import subprocess
import sys

from typer.testing import CliRunner

from labelgen import format as fmt

runner = CliRunner()


def one_line_error(stderr: str, program: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{program}:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_ray_address_with_nothing_listening_is_one_line_not_a_hang(tiny_teacher, corpus, tmp_path):
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        r = subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                            str(corpus / "docs.jsonl"), "--out", str(tmp_path / "l"), "--num-workers", "2",
                            "--no-progress", "--ray", address], capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr
        assert f"--ray {address}: no Ray cluster answers there" in one_line_error(r.stderr, "labelgen")


def test_training_refuses_a_manifest_whose_row_counts_disagree_with_its_shards(topk_labels, student_config, tmp_path):
    from student_train.cli import app
    labels = tmp_path / "labels"
    shutil.copytree(topk_labels, labels, ignore=shutil.ignore_patterns("*.lock"))
    m = json.loads((labels / "manifest.json").read_text())
    for shard in m["shards"]:   # whichever the loader opens first
        shard["rows"] += 1
    m["fingerprint"] = fmt.dataset_fingerprint(m)   # a consistent forgery
    (labels / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(app, ["train", "--labels", str(labels), "--student-config", student_config, "--out",
                            str(tmp_path / "run"), "--max-steps", "2", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    line = one_line_error(r.stderr, "student-train")
    assert (found := re.search(r"shard-\d+.parquet: (\d+) rows, manifest says (\d+)", line)), line
    assert int(found.group(2)) == int(found.group(1)) + 1


FULL_DISK_AT_WRITE = """
import errno
from labelgen import fsutil
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


def test_import_refuses_a_key_repeated_in_one_position_as_it_refuses_06_for_6(tiny_teacher, tmp_path):
    from labelgen.cli import app
    line = ('{"prompt_token_ids": [5, 6], "prompt_logprobs": [null, '
            '{"6": {"logprob": -0.5, "rank": 1}, "6": {"logprob": -0.7, "rank": 2}}]}')
    (tmp_path / "dup.jsonl").write_text(line + "\n")
    r = runner.invoke(app, ["import", str(tmp_path / "dup.jsonl"), "--tokenizer", tiny_teacher, "--k", "1",
                            "--out", str(tmp_path / "l")])
    assert r.exit_code == 2, r.output
    assert "dup.jsonl:1: key '6' appears twice in one object" in one_line_error(r.stderr, "labelgen")
    assert not (tmp_path / "l" / "manifest.json").exists()


def test_rounds_takes_the_skip_bad_its_errors_suggest(tmp_path):
    from student_train.cli import app
    r = runner.invoke(app, ["rounds", "--teacher", "t", "--student", "s", "--prompts", "p.jsonl", "--out",
                            str(tmp_path / "r"), "--skip-bad", "--dry-run"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skip_bad"] is True, r.output
    from student_train.config import RoundsConfig
    from student_train.rounds import EXECUTION_ONLY
    assert "skip_bad" in EXECUTION_ONLY and RoundsConfig(teacher="t", student="s", prompts=("p",), out="o").skip_bad is False
