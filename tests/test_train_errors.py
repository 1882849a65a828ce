import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from student_train.cli import app

runner = CliRunner()


def run_train(labels, student_config, out, *extra):
    return runner.invoke(app, ["train", "--labels", str(labels), "--student-config", student_config,
                               "--out", str(out), "--max-steps", "2", "--no-progress", *extra])


def copy_labels(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def assert_one_line_error(r, pattern):
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.startswith("student-train: error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    assert "Traceback" not in r.output


def test_missing_manifest(student_config, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_train(tmp_path / "empty", student_config, tmp_path / "o"), "no manifest")
    assert not (tmp_path / "o").exists()


def test_unknown_format_version(topk_labels, student_config, tmp_path):
    d = copy_labels(topk_labels, tmp_path / "l")
    edit_manifest(d, lambda m: m.update(format_version="9.0"))
    assert_one_line_error(run_train(d, student_config, tmp_path / "o"), r"format version 9.0 is not supported; this labelgen reads 1.x, 2.x")


def test_truncated_shard_is_found_when_read_and_with_verify_before_the_first_step(topk_labels, student_config, tmp_path):
    """Start-up asks the store for the manifest only (a million shards are not
    stat'ed by every rank); a shard is checked when the loader opens it, and
    --verify checks every one first."""
    d = copy_labels(topk_labels, tmp_path / "l")
    last = sorted(d.glob("shard-*.parquet"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    assert_one_line_error(run_train(d, student_config, tmp_path / "o", "--max-steps", "50"),
                          r"shard-000005.parquet: .* \(truncated or replaced\)")
    assert_one_line_error(run_train(d, student_config, tmp_path / "v", "--verify"),
                          r"shard-000005.parquet: .* \(truncated or replaced\)")
    assert not (tmp_path / "v" / "metrics.jsonl").exists()


@pytest.mark.parametrize("old, new, value", [("--alpha", "ce_weight", 0.25), ("--temperature", "kd_temperature", 2.0),
                                             ("--num-workers", "loader_workers", 3), ("--alpha-end", "ce_weight_end", 0.5)])
def test_a_renamed_option_still_works_for_a_release_with_a_one_line_note(topk_labels, student_config, tmp_path, old,
                                                                           new, value):
    r = run_train(topk_labels, student_config, tmp_path / "o", old, str(value), "--tail", "renorm", "--dry-run")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[new] == value
    flag = "--" + new.replace("_", "-")
    assert r.stderr.splitlines() == [f"note: {old} is now {flag}; the old name is read until the next release"]


def test_a_config_file_with_an_old_key_is_read_under_the_new_name(topk_labels, student_config, tmp_path):
    (tmp_path / "c.yaml").write_text("alpha: 0.3\nalpha_end: 0.1\n")
    r = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--labels", str(topk_labels), "--student-config",
                            student_config, "--out", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["ce_weight"], json.loads(r.stdout)["ce_weight_end"]) == (0.3, 0.1)
    assert len(r.stderr.splitlines()) == 2 and "setting 'alpha' is now 'ce_weight'" in r.stderr
    (tmp_path / "c.yaml").write_text("alpha: 0.3\nce_weight: 0.1\n")
    r = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--labels", str(topk_labels), "--student-config",
                            student_config, "--out", str(tmp_path / "o"), "--dry-run"])
    assert_one_line_error(r, r"c.yaml: 'alpha' is the old name of 'ce_weight': keep one of the two keys")


def test_corrupted_shard_is_found_with_verify(topk_labels, student_config, tmp_path):
    d = copy_labels(topk_labels, tmp_path / "l")
    shard = sorted(d.glob("shard-*.parquet"))[2]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_train(d, student_config, tmp_path / "o", "--verify"), r"shard-000002.parquet: sha256 does not match")


def test_tokenizer_mismatch_is_refused_saying_what_differs(topk_labels, tmp_path):
    from labelgen.tools.demo import DemoTeacherConfig, build_model, train_tokenizer
    tok = train_tokenizer(["completely different text " * 50, "zebra quartz " * 40], 300)
    model = build_model(DemoTeacherConfig(vocab_size=300, hidden_size=64, layers=1, heads=1), len(tok))
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    r = runner.invoke(app, ["train", "--labels", str(topk_labels), "--student", str(tmp_path / "student"),
                            "--out", str(tmp_path / "o"), "--max-steps", "2", "--no-progress"])
    assert_one_line_error(r, r"different tokenizer than the student's \(differs in: vocabulary size 512 vs \d+, vocabulary/merges")


def test_k_larger_than_the_labels_hold(topk_labels, student_config, tmp_path):
    assert_one_line_error(run_train(topk_labels, student_config, tmp_path / "o", "--k", "17"),
                          r"--k 17 is larger than the 16 entries the labels hold")


def test_a_loss_the_labels_cannot_feed(topk_labels, student_config, tmp_path):
    assert_one_line_error(run_train(topk_labels, student_config, tmp_path / "o", "--loss", "sft"),
                          r"--loss sft needs samples or scored labels")


def test_an_empty_label_set(topk_labels, student_config, tmp_path):
    from labelgen.shards import ShardWriter
    with ShardWriter(tmp_path / "empty", "topk", 16, 512, header={"tokenizer": json.loads(
            (topk_labels / "manifest.json").read_text())["tokenizer"]}):
        pass
    assert_one_line_error(run_train(tmp_path / "empty", student_config, tmp_path / "o"), "hold no positions to train on")


def test_a_non_empty_run_directory_needs_resume_or_overwrite(topk_labels, student_config, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("1")
    assert_one_line_error(run_train(topk_labels, student_config, tmp_path / "o"), r"pass --resume .* or --overwrite")


@pytest.mark.parametrize("extra, pattern", [
    (["--ce-weight", "1.5"], r"--ce-weight: must be in \[0, 1\]"),
    (["--tail", "tail", "--kd-temperature", "2"], r"--kd-temperature: 2 cannot soften .* under --tail tail, whose "
                                                  r"shape is unknown: pass --tail renorm .* or leave --kd-temperature at 1"),
    (["--kd-temperature", "2"], r"under --tail tail \(the default for top-k labels\), .* pass --tail renorm"),
    (["--temperature", "2", "--kd-temperature", "2"], r"--temperature: the old name of --kd-temperature: pass one"),
    (["--loss", "distill"], r"--loss: must be one of kd, ce, sft"),
    (["--dtype", "float16"], r"--dtype: must be one of auto, float32, bfloat16"),
    (["--min-lr-ratio", "2"], r"--min-lr-ratio: must be in \[0, 1\]"),
])
def test_bad_options(topk_labels, student_config, tmp_path, extra, pattern):
    assert_one_line_error(run_train(topk_labels, student_config, tmp_path / "o", *extra), pattern)


def test_a_corrupted_byte_stops_training_without_verify(topk_labels, student_config, tmp_path):
    d = copy_labels(topk_labels, tmp_path / "l")
    import pyarrow.parquet as pq
    shard = sorted(d.glob("shard-*.parquet"))[2]
    chunk = next(c for c in (pq.ParquetFile(shard).metadata.row_group(0).column(j) for j in range(8))
                 if c.path_in_schema.startswith("topk_logprobs"))
    data = bytearray(shard.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 20] ^= 0x40   # a byte of the page's data: its CRC32 fails
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_train(d, student_config, tmp_path / "o", "--max-steps", "40"),
                          r"shard-000002.parquet: row group 0: .*CRC")


def test_a_label_set_tokenizer_never_brings_code(topk_labels, student_config, tmp_path):
    d = copy_labels(topk_labels, tmp_path / "l")
    marker = tmp_path / "code_ran"
    (d / "tokenizer" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((d / "tokenizer" / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (d / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["train", "--labels", str(d), "--student-config", student_config, "--out", str(tmp_path / "o"),
                            "--max-steps", "1", "--no-progress"], input="y\ny\n")
    assert not marker.exists(), "code from the label set's tokenizer ran"
    assert "Traceback" not in r.output


def test_a_pickled_optimizer_state_is_refused_in_one_line(topk_labels, student_config, tmp_path):
    import torch
    assert run_train(topk_labels, student_config, tmp_path / "o").exit_code == 0
    ckpt = tmp_path / "o" / "step_000002"
    torch.save({"state": {}, "param_groups": [], "payload": Exception("not a tensor")}, ckpt / "optimizer.pt")
    r = run_train(topk_labels, student_config, tmp_path / "o", "--max-steps", "3", "--resume")
    assert_one_line_error(r, r"optimizer.pt: not a plain tensor file .* which labelgen refuses")
    assert "weights_only=False" not in r.output


def test_a_metrics_log_symlinked_elsewhere_is_not_written_through_on_resume(topk_labels, student_config, tmp_path):
    assert run_train(topk_labels, student_config, tmp_path / "o").exit_code == 0
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("keep me\n")
    (tmp_path / "o" / "metrics.jsonl").unlink()
    (tmp_path / "o" / "metrics.jsonl").symlink_to(elsewhere)
    r = run_train(topk_labels, student_config, tmp_path / "o", "--max-steps", "3", "--resume")
    assert_one_line_error(r, r"metrics.jsonl: is a symlink; refusing to write through it")
    assert elsewhere.read_text() == "keep me\n"


def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun_plainly(topk_labels, student_config, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text("")   # what a run that died early leaves
    r = run_train(topk_labels, student_config, tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "step_000002").is_dir()


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_half_checkpoint(topk_labels, student_config,
                                                                                       tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    r = run_train(topk_labels, student_config, tmp_path / "o", "--save-every", "1")
    assert_one_line_error(r, r"step_000001: cannot write the checkpoint \(.*No space left on device")
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.startswith((".step", "step"))]


def test_a_full_disk_while_logging_metrics_is_one_line(topk_labels, student_config, tmp_path, monkeypatch):
    import errno
    from student_train.runtime import MetricsLog

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    monkeypatch.setattr(MetricsLog, "write", full)
    assert_one_line_error(run_train(topk_labels, student_config, tmp_path / "o"), r"metrics.jsonl: No space left on device$")


def test_a_metrics_log_torn_by_a_crash_resumes_and_a_damaged_middle_is_refused(topk_labels, student_config, tmp_path):
    assert run_train(topk_labels, student_config, tmp_path / "o", "--log-every", "1").exit_code == 0
    log = tmp_path / "o" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])   # the crash cut a line in two
    r = run_train(topk_labels, student_config, tmp_path / "o", "--max-steps", "3", "--log-every", "1", "--resume")
    assert r.exit_code == 0, r.output
    steps = [json.loads(l)["step"] for l in log.read_text().splitlines() if "eval" not in l]
    assert steps == sorted(set(steps)) and steps[-1] == 3
    log.write_text("\n".join([lines[0], "garbage", lines[-1]]) + "\n")
    r = run_train(topk_labels, student_config, tmp_path / "o", "--max-steps", "4", "--resume")
    assert_one_line_error(r, r"metrics.jsonl: not a metrics log \(a line without a step\)")


def test_a_bare_cuda_device_means_this_ranks_gpu():
    # `--device cuda` failed on a GPU machine: torch.cuda.set_device needs an index.
    import torch
    from student_train.runtime import resolve_device
    assert resolve_device("cuda", 3, cuda=True) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3, cuda=True) == torch.device("cuda", 1)
    assert resolve_device("auto", 2, cuda=True) == torch.device("cuda", 2)
    assert resolve_device("auto", 0, cuda=False) == torch.device("cpu")
    assert resolve_device("cpu", 5, cuda=True) == torch.device("cpu")
