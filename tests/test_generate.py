import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from labelgen.cli import app
from labelgen.generate.config import GenerateConfig
from helpers import assert_stored_coverage, assert_stored_target_logprob
from labelgen.format import Encoding
from test_format import assert_same_entries
from labelgen.generate import run
from labelgen.generate.finalize import finalize
from labelgen.generate.requests import derive_seed
from labelgen.generate.work import windows
from labelgen.shards import ShardReader
from labelgen.tools.inspection import validate

runner = CliRunner()


def cfg(teacher, inputs, out, **kw):
    base = dict(teacher=teacher, inputs=tuple(map(str, inputs)), out=str(out), k=16, max_seq_len=64,
                batch_tokens=256, rows_per_shard=5, progress=False, device="cpu")
    base.update(kw)
    return GenerateConfig(**base)


def rows_of(d, columns=None):
    return sorted(ShardReader(d).rows(columns), key=lambda r: (r["example_id"], r.get("window_offset", 0), r.get("sample_index", 0)))


def assert_same_rows(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_windows_predict_every_token_after_the_first_exactly_once():
    ids = np.arange(100)
    ws = windows(ids, 16, 15)
    targets = np.concatenate([w[1:] for _, w in ws])
    np.testing.assert_array_equal(targets, np.arange(1, 100))
    assert [o for o, _ in ws][:3] == [0, 15, 30]
    assert windows(np.arange(5), 16, 15)[0][1].tolist() == [0, 1, 2, 3, 4]


def test_topk_labels_match_a_plain_forward_pass(tiny_teacher, corpus, tmp_path):
    from transformers import AutoModelForCausalLM
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l", id_field="id"))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    rows = rows_of(tmp_path / "l")
    assert {r["example_id"] for r in rows} == {f"doc{i}" for i in range(24)}
    for r in rows[:6]:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(r["input_ids"])[None]).logits[0, :-1].float(), -1)
        top = lp.topk(16, -1)
        assert_same_entries(top.indices.numpy(), top.values.numpy(), r["topk_ids"], r["topk_logprobs"],
                            Encoding(), slack=1e-4)
        assert_stored_coverage(r["coverage"], top.values.exp().sum(-1).numpy())
        actual = lp.gather(1, torch.as_tensor(r["input_ids"][1:])[:, None])[:, 0].numpy()
        assert_stored_target_logprob(r["target_logprob"], actual, atol=1e-4)
        ranks = (lp > lp.gather(1, torch.as_tensor(r["input_ids"][1:])[:, None])).sum(-1).numpy()
        np.testing.assert_array_equal(r["target_rank"], ranks)


def test_adaptive_truncation_keeps_entries_until_the_mass_or_the_floor(tiny_teacher, corpus, tmp_path):
    from transformers import AutoModelForCausalLM
    from student_train.data import collate, columns_from_rows
    from student_train.losses import topk_kd
    m = run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l", id_field="id", keep_mass=0.5, min_prob=0.01))
    assert m["encoding"]["variable_k"] and validate(tmp_path / "l")["ok"]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    rows = rows_of(tmp_path / "l")
    for r in rows[:6]:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(r["input_ids"])[None]).logits[0, :-1].float(), -1)
        top = lp.topk(16, -1)
        p = top.values.double().exp().numpy()
        before = np.cumsum(p, 1) - p
        expect = np.maximum(np.cumprod((before < 0.5) & (p >= 0.01), 1).sum(1), 1)
        # Entries at the rule's edge may flip within float error; nothing else may.
        assert np.mean(r["topk_lengths"] == expect) > 0.97
        for i, n in enumerate(r["topk_lengths"]):
            assert np.isfinite(r["topk_logprobs"][i, :n]).all() and np.isneginf(r["topk_logprobs"][i, n:]).all()
            assert set(r["topk_ids"][i, :n]) == set(top.indices[i, :n].tolist())
            assert_stored_coverage(r["coverage"][i], p[i, :n].sum())
    assert 1 <= np.mean(np.concatenate([r["topk_lengths"] for r in rows])) < 16
    batch = collate(columns_from_rows(rows[:4]), "topk")
    student = torch.randn(*batch["topk_ids"].shape[:2], 512, requires_grad=True)
    loss = topk_kd(student, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"], batch["mask"], tail="tail")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_generated_labels_validate_and_cover_every_document_token(tiny_teacher, corpus, tmp_path):
    from transformers import AutoTokenizer
    m = run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l", id_field="id"))
    assert validate(tmp_path / "l")["ok"]
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    docs = [json.loads(line) for line in open(corpus / "docs.jsonl")]
    expected = sum(len(tok(d["text"])["input_ids"]) - 1 for d in docs)
    assert m["counts"]["positions"] == expected
    assert m["counts"]["examples"] == 24 and len(m["shards"]) == 5
    man = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert man["teacher"]["backend"] == "hf" and man["tokenizer"]["fingerprint"].startswith("sha256:")
    assert man["teacher"]["logits_size"] == 512 and man["config"]["k"] == 16


def test_sampled_completions_reproduce_with_the_same_seed_and_differ_across_examples(tiny_teacher, corpus, tmp_path):
    c = dict(mode="sample", prompt_field="prompt", n=2, max_new_tokens=12, temperature=1.0, top_p=1.0)
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "a", **c))
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "b", **c))
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert_same_rows(a, b)
    assert len(a) == 10
    assert all(r["seed"] == derive_seed(0, r["example_id"], r["sample_index"]) for r in a)
    completions = {tuple(r["completion_ids"]) for r in a}
    assert len(completions) == 10, "every (example, sample) pair should get its own stream"
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "c", seed=1, **c))
    assert {tuple(r["completion_ids"]) for r in rows_of(tmp_path / "c")} != completions
    assert all(r["completion_logprobs"].shape == r["completion_ids"].shape for r in a)


def test_greedy_mode_writes_one_argmax_completion_per_prompt(tiny_teacher, corpus, tmp_path):
    from transformers import AutoModelForCausalLM
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "g", mode="greedy", prompt_field="prompt", max_new_tokens=8))
    rows = rows_of(tmp_path / "g")
    assert len(rows) == 5 and all(r["sample_index"] == 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    r = rows[0]
    out = model.generate(torch.as_tensor(r["prompt_ids"])[None], max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(out[0, len(r["prompt_ids"]):].numpy()[: len(r["completion_ids"])], r["completion_ids"])


def test_messages_are_rendered_with_the_chat_template(tiny_teacher, corpus, tmp_path):
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "m", mode="greedy", messages_field="messages", max_new_tokens=4))
    r = rows_of(tmp_path / "m")[0]
    assert r["prompt"].startswith("<|user|>\nwrite f") and r["prompt"].endswith("<|assistant|>\n")


def test_jsonl_zst_and_parquet_inputs_give_the_same_labels_as_jsonl(tiny_teacher, corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    raw = (corpus / "docs.jsonl").read_bytes()
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    docs = [json.loads(line) for line in raw.decode().splitlines()]
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "docs.parquet")
    outs = []
    for name in ("docs.jsonl.zst", "docs.parquet"):
        run(cfg(tiny_teacher, [tmp_path / name], tmp_path / name.replace(".", "_"), id_field="id"))
        outs.append(rows_of(tmp_path / name.replace(".", "_")))
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "ref", id_field="id"))
    ref = rows_of(tmp_path / "ref")
    for o in outs:
        assert_same_rows(o, ref)


def test_the_progress_bar_measures_input_bytes_read_in_the_one_pass(corpus, tmp_path):
    """No counting pass: the reader's position (compressed bytes for .zst)
    rises with every record and ends at the inputs' total size."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from labelgen.generate.inputs import ReadPosition, expand_paths, read_records
    raw = (corpus / "docs.jsonl").read_bytes()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in raw.decode().splitlines()]), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_bytes(raw)
    (tmp_path / "d.txt").write_text("one document\n")
    files = expand_paths([str(tmp_path)])
    position, seen = ReadPosition(), []
    for rec in read_records(files, position=position):
        seen.append(position.bytes)
    assert len(seen) == 3 * len(raw.decode().splitlines()) + 1
    assert seen == sorted(seen) and 0 < seen[0] and position.bytes == sum(f.stat().st_size for f in files)
    # The generation bar ends full.
    from labelgen.generate.pipeline import Progress
    bar = Progress(GenerateConfig(teacher="t", inputs=("x",), out="o", progress=True), position.bytes)
    bar.update(3, 100, position.bytes)
    assert bar.bar.n == bar.bar.total == position.bytes
    bar.close()


def test_two_workers_and_finalize_give_the_same_rows_as_one_worker(tiny_teacher, corpus, tmp_path):
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "one"))
    for w in range(2):
        run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "two", num_workers=2, worker_index=w))
    assert not (tmp_path / "two" / "manifest.json").exists()
    finalize(tmp_path / "two")
    assert validate(tmp_path / "two")["ok"]
    assert_same_rows(rows_of(tmp_path / "two"), rows_of(tmp_path / "one"))


def test_finalize_fails_when_a_worker_is_missing(tiny_teacher, corpus, tmp_path):
    from labelgen.format import FormatError
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "two", num_workers=2, worker_index=0))
    with pytest.raises(FormatError, match=r"no manifest from worker\(s\) 1 of 2"):
        finalize(tmp_path / "two")


def test_finalize_missing_lists_the_unfinished_workers_as_a_slurm_array_and_writes_nothing(tiny_teacher, corpus, tmp_path):
    from typer.testing import CliRunner
    from labelgen.cli import app
    out = tmp_path / "five"
    for w in (0, 2):
        run(cfg(tiny_teacher, [corpus / "docs.jsonl"], out, num_workers=5, worker_index=w))
    before = sorted(p.name for p in out.iterdir())
    r = CliRunner().invoke(app, ["finalize", str(out), "--missing"])
    assert r.exit_code == 0 and r.stdout.strip() == "1,3-4", r.output
    assert "3 of 5 workers have not finished" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    for w in (1, 3, 4):
        run(cfg(tiny_teacher, [corpus / "docs.jsonl"], out, num_workers=5, worker_index=w))
    r = CliRunner().invoke(app, ["finalize", str(out), "--missing"])
    assert r.exit_code == 0 and r.stdout.strip() == "" and "0 of 5 workers" in r.stderr
    r = CliRunner().invoke(app, ["finalize", str(tmp_path), "--missing"])
    assert r.exit_code == 2 and "no generation run here" in r.stderr


def test_finalize_missing_on_a_finished_single_worker_run_resubmits_nothing(topk_labels):
    """A one-worker run writes manifest.json itself and no partial manifest: nothing is left to run."""
    from typer.testing import CliRunner
    from labelgen.cli import app
    r = CliRunner().invoke(app, ["finalize", str(topk_labels), "--missing"])
    assert r.exit_code == 0 and r.stdout == "" and r.stderr.strip() == "0 of 1 workers have not finished", r.output


@pytest.mark.slow
def test_resume_after_kill_writes_each_row_once(tiny_teacher, corpus, tmp_path):
    args = [sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher,
            "--input", str(corpus / "docs.jsonl"), "--out", str(tmp_path / "killed"), "--k", "16",
            "--max-seq-len", "64", "--batch-tokens", "64", "--rows-per-shard", "2", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "shard-000001.parquet").exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "killed too late to test resume"
    assert not validate(tmp_path / "killed")["ok"]
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("*.parquet")}
    r = runner.invoke(app, args[3:] + ["--resume"])
    assert r.exit_code == 0, r.output
    for name, mtime in done_before.items():   # finished shards were kept, not redone
        assert (tmp_path / "killed" / name).stat().st_mtime_ns == mtime
    assert validate(tmp_path / "killed")["ok"]
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "whole", batch_tokens=64, rows_per_shard=2))
    assert_same_rows(rows_of(tmp_path / "killed"), rows_of(tmp_path / "whole"))


def test_rerun_is_refused_without_resume_and_with_a_changed_config(tiny_teacher, corpus, tmp_path):
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l"))
    with pytest.raises(ValueError, match="already holds this run; pass --resume"):
        run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l"))
    with pytest.raises(ValueError, match=r"different config \(changed: k\)"):
        run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l", k=8, resume=True))
    m = run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "l", k=8, overwrite=True))
    assert m["k"] == 8 and validate(tmp_path / "l")["ok"]


def test_a_run_hashed_before_adaptive_truncation_existed_still_resumes(tmp_path):
    """The output hash of a run that sets no truncation is the hash over the
    settings that existed before keep_mass/min_prob: such a run resumes."""
    import hashlib
    c = cfg("t", ["in.jsonl"], tmp_path / "l")
    before = {k: v for k, v in c.to_dict().items()
              if k not in ("keep_mass", "min_prob", "round", "out", "resume", "overwrite", "num_workers", "worker_index",
                           "progress", "dry_run", "skip_bad", "tp", "peak_tflops", "draw_logprobs")}
    assert c.output_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg("t", ["in.jsonl"], tmp_path / "l", keep_mass=0.9).output_hash() != c.output_hash()


def test_dry_run_prints_the_resolved_config_from_file_and_flags(tiny_teacher, corpus, tmp_path):
    docs = str(corpus / "docs.jsonl")
    (tmp_path / "gen.yaml").write_text(f"teacher: {tiny_teacher}\ninputs: [{docs}]\nout: o\nk: 8\n")
    r = runner.invoke(app, ["generate", str(tmp_path / "gen.yaml"), "--k", "32", "--dry-run", "--engine", "tensor_parallel_size=2"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["k"] == 32 and d["inputs"] == [docs] and d["engine"] == {"tensor_parallel_size": 2} and d["mode"] == "topk"
    assert d["max_seq_len"] == 512   # resolved against the teacher (its context, under the 2048 cap)


def test_slurm_array_variables_pick_the_worker(tiny_teacher, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    r = runner.invoke(app, ["generate", "--teacher", tiny_teacher, "--input", str(corpus), "--out", "o", "--dry-run"])
    d = json.loads(r.stdout)
    assert (d["num_workers"], d["worker_index"]) == (4, 3)


def test_a_resubmitted_array_task_keeps_the_run_s_worker_count(tiny_teacher, corpus, tmp_path, monkeypatch):
    """`sbatch --array=$(labelgen finalize OUT --missing)` resubmits task 2 alone: Slurm says 1 task (2 of 2..2);
    the run in OUT says 4 workers, and the task is worker 2 of them."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text(json.dumps({"config": {"num_workers": 4}}))
    for key, value in {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "2",
                       "SLURM_ARRAY_TASK_MAX": "2"}.items():
        monkeypatch.setenv(key, value)
    r = runner.invoke(app, ["generate", "--teacher", tiny_teacher, "--input", str(corpus), "--out", str(tmp_path / "o"),
                            "--dry-run"])
    d = json.loads(r.stdout)
    assert (d["num_workers"], d["worker_index"]) == (4, 2), r.output


def test_blocked_topk_equals_torch_topk():
    from labelgen.backends.hf import _row_stats, _topk_blocked
    torch.manual_seed(0)
    for V in (1000, 32001, 151936):
        logits = torch.randn(64, V) * 3
        ref = logits.topk(64, -1)
        v, i = _topk_blocked(logits, 64)
        assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
    tgt = logits.gather(1, torch.arange(64)[:, None])
    lse, rank = _row_stats(logits, tgt)
    torch.testing.assert_close(lse[:, 0], torch.logsumexp(logits, -1))
    assert torch.equal(rank, (logits > tgt).sum(-1))


def test_a_worker_starting_late_leaves_alone_the_shard_another_worker_is_writing(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "labels"
    cfg = GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(out), k=4, max_seq_len=64,
                         rows_per_shard=4, progress=False, device="cpu", num_workers=3)
    import dataclasses
    run(dataclasses.replace(cfg, worker_index=0))
    (out / "shard-000002.parquet.tmp").write_bytes(b"worker 2, in progress")   # another worker's shard
    (out / "shard-000004.parquet.tmp").write_bytes(b"worker 1, killed")        # this worker's own leftover
    run(dataclasses.replace(cfg, worker_index=1))
    assert (out / "shard-000002.parquet.tmp").read_bytes() == b"worker 2, in progress"
    assert not (out / "shard-000004.parquet.tmp").exists() and (out / "shard-000004.parquet").is_file()
    (out / "shard-000002.parquet.tmp").unlink()
    run(dataclasses.replace(cfg, worker_index=2))
    finalize(out)
    assert validate(out)["ok"]


def test_cpu_chunk_labels_equal_the_full_reductions_for_targets_inside_at_and_beyond_the_top_k():
    from labelgen.backends.hf import chunk_labels
    torch.manual_seed(0)
    logits = torch.randn(40, 3000) * 3
    logits[5, :10] = 7.0                                  # ties at the k-th value
    order = logits.argsort(-1, descending=True)
    targets = torch.cat([order[:10, 0], order[10:20, 7], order[20:30, 500], torch.full((10,), 2)])
    targets[5] = 3                                        # a target tied with the 8th-best entry
    top_i, top_lp, cov, tgt_lp, rank = chunk_labels(logits.clone(), targets, 8)
    lp = torch.log_softmax(logits, -1)
    ref = lp.topk(8, -1)
    torch.testing.assert_close(top_lp, ref.values)
    assert torch.equal(top_i[torch.arange(40) != 5], ref.indices[torch.arange(40) != 5])
    torch.testing.assert_close(cov, ref.values.exp().sum(-1))
    want = lp.gather(1, targets[:, None])
    torch.testing.assert_close(tgt_lp, want[:, 0])
    assert torch.equal(rank, (lp > want).sum(-1))
    assert {0, 7, 500} <= set(rank.tolist())
