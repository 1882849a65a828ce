"""On-policy distillation in batch rounds: the scored record kind, `generate
--mode score`, `--loss opd` and `student-train rounds`."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from labelgen import format as fmt
from labelgen.format import FormatError
from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.generate.inputs import InputError
from labelgen.shards import ShardReader, ShardWriter
from labelgen.tools.inspection import inspect, validate
from student_train.data import collate, columns_from_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scored_row(rng, ex, prompt, completion, vocab, k, round_index=0):
    lp = np.sort(np.log(rng.dirichlet(np.ones(vocab), size=completion))[:, :k], axis=1)[:, ::-1].copy()
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(completion)])
    return {fmt.EXAMPLE_ID: ex, fmt.SAMPLE_INDEX: 1, fmt.ROUND: round_index,
            fmt.INPUT_IDS: rng.integers(0, vocab, prompt + completion), fmt.TOPK_IDS: ids, fmt.TOPK_LOGPROBS: lp,
            fmt.COVERAGE: np.exp(lp).sum(1), fmt.TARGET_LOGPROB: -rng.random(completion).astype(np.float32) * 3,
            fmt.TARGET_RANK: rng.integers(0, 50, completion), fmt.SAMPLING_LOGPROB: -rng.random(completion) * 2}


def test_scored_rows_round_trip_and_collate_labels_only_the_completion(rng, tmp_path):
    rows = [scored_row(rng, "a", 5, 3, 300, 4, round_index=2), scored_row(rng, "b", 2, 6, 300, 4, round_index=2)]
    with ShardWriter(tmp_path / "s", "scored", 4, 300, encoding=fmt.Encoding(logprob_codec="f32", position_codec="f32")) as w:
        for r in rows:
            w.write(r)
    assert validate(tmp_path / "s")["ok"]
    reader = ShardReader(tmp_path / "s")
    assert reader.kind == "scored" and reader.manifest["counts"]["positions"] == 9
    back = list(reader.rows())
    for r, b in zip(rows, back):
        np.testing.assert_array_equal(b[fmt.INPUT_IDS], r[fmt.INPUT_IDS])
        np.testing.assert_allclose(b[fmt.SAMPLING_LOGPROB], r[fmt.SAMPLING_LOGPROB], rtol=1e-6)
        np.testing.assert_allclose(b[fmt.TOPK_LOGPROBS], r[fmt.TOPK_LOGPROBS], rtol=1e-6)
        assert b[fmt.ROUND] == 2 and b[fmt.SAMPLE_INDEX] == 1
    cols = {name: v for name, v in columns_from_rows(back).items() if name in fmt.record_kind("scored").loader_columns}
    batch = collate(cols, "scored")
    # Row a: 8 ids, the last 3 are the completion: positions 4, 5, 6 predict them.
    assert batch["mask"][0].tolist() == [False] * 4 + [True] * 3
    assert batch["mask"][1].tolist() == [False, True, True, True, True, True, True]
    assert torch.equal(batch["targets"][0, 4:7], torch.as_tensor(rows[0][fmt.INPUT_IDS][5:8]))
    np.testing.assert_allclose(batch["teacher_logprob"][0, 4:7].numpy(), rows[0][fmt.TARGET_LOGPROB], rtol=1e-6)
    np.testing.assert_allclose(batch["sampling_logprob"][1, 1:7].numpy(), rows[1][fmt.SAMPLING_LOGPROB], rtol=1e-6)
    np.testing.assert_array_equal(batch["topk_ids"][0, 4:7].numpy(), rows[0][fmt.TOPK_IDS])
    assert float(batch["teacher_logprob"][0, :4].abs().sum()) == 0   # prompt positions hold nothing


def test_scored_rows_with_more_positions_than_their_completion_can_hold_are_refused(rng, tmp_path):
    bad = scored_row(rng, "a", 1, 3, 300, 4)
    bad[fmt.INPUT_IDS] = bad[fmt.INPUT_IDS][:3]   # 3 ids predict at most 2 tokens
    with pytest.raises(FormatError, match="example 'a': 3 completion positions for 3 input ids"):
        fmt.encode_rows("scored", [bad], 4, 300, fmt.Encoding(id_map="none"))
    short = scored_row(rng, "b", 4, 3, 300, 4)
    short[fmt.SAMPLING_LOGPROB] = short[fmt.SAMPLING_LOGPROB][:2]
    with pytest.raises(FormatError, match="sampling_logprob has 2 entries, expected 3"):
        fmt.encode_rows("scored", [short], 4, 300, fmt.Encoding(id_map="none"))


def test_a_forged_scored_row_whose_positions_do_not_fit_its_ids_is_refused_before_a_batch(rng, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from labelgen.store import storage
    d, enc = tmp_path / "l", fmt.Encoding(id_map="none")
    with ShardWriter(d, "scored", 4, 300, encoding=enc) as w:
        w.write(scored_row(rng, "a", 4, 2, 300, 4))
        w.write(scored_row(rng, "b", 1, 3, 300, 4))
    shard = d / "shard-000000.parquet"
    table = pq.read_table(shard)
    ids = table.column(fmt.INPUT_IDS).combine_chunks().flatten()   # 6 + 4 ids: give row a 2 of them, row b 8
    table = table.set_column(table.schema.get_field_index(fmt.INPUT_IDS), fmt.INPUT_IDS,
                             pa.ListArray.from_arrays(pa.array([0, 2, 10], pa.int32()), ids))
    pq.write_table(table, shard, **fmt.parquet_writer_options("scored", enc))
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0].update(sha256=storage.sha256_file(shard), footer_sha256=storage.footer_sha256(shard),
                          bytes=shard.stat().st_size)
    (d / "manifest.json").write_text(json.dumps(m))   # a consistent forgery: only the rows' own shapes lie
    with pytest.raises(FormatError, match="row 0: 2 completion positions for 2 input ids"):
        list(ShardReader(d).rows())


def sample_then_score(teacher, prompts, tmp_path, **score_kw):
    run(GenerateConfig(teacher=teacher, inputs=(str(prompts),), out=str(tmp_path / "samples"), mode="sample",
                       prompt_field="prompt", n=2, max_new_tokens=10, temperature=1.0, top_p=1.0, progress=False,
                       device="cpu"))
    m = run(GenerateConfig(teacher=teacher, inputs=(str(tmp_path / "samples"),), out=str(tmp_path / "scored"),
                           mode="score", k=8, progress=False, device="cpu", **score_kw))
    return m


def test_score_mode_labels_each_completion_token_and_a_model_scoring_itself_has_zero_reverse_kl(tiny_teacher, corpus, tmp_path):
    m = sample_then_score(tiny_teacher, corpus / "prompts.jsonl", tmp_path, round=3, rows_per_shard=3)
    samples = {(r["example_id"], r["sample_index"]): r for r in ShardReader(tmp_path / "samples").rows()}
    assert m["kind"] == "scored" and m["counts"]["rows"] == 10 and len(m["shards"]) == 4
    assert m["counts"]["positions"] == sum(len(r["completion_ids"]) for r in samples.values())
    assert m["scored"]["round"] == 3 and m["scored"]["samples"]["fingerprint"] == fmt.read_manifest(tmp_path / "samples")["fingerprint"]
    assert validate(tmp_path / "scored")["ok"]
    for row in ShardReader(tmp_path / "scored").rows():
        s = samples[(row["example_id"], row["sample_index"])]
        np.testing.assert_array_equal(row["input_ids"], np.concatenate([s["prompt_ids"], s["completion_ids"]]))
        assert row["round"] == 3 and len(row["coverage"]) == len(s["completion_ids"])
        np.testing.assert_array_equal(row["sampling_logprob"], s["completion_logprobs"])
        # The sampler is the teacher: its logprob of each token is the teacher's (stored in steps of 1/64 nat).
        np.testing.assert_allclose(row["target_logprob"], s["completion_logprobs"], atol=1 / 128 + 1e-4)
    info = inspect(tmp_path / "scored")
    assert abs(info["reverse_kl"]) < 0.005 and info["teacher_logprob_mean"] < -0.1
    from labelgen.tools.inspection import format_inspect
    assert "completions of round(s) 3" in format_inspect(info) and "reverse KL to the teacher" in format_inspect(info)


def test_score_mode_refuses_a_label_set_of_another_kind_or_tokenizer(tiny_teacher, topk_labels, tmp_path):
    with pytest.raises(InputError, match="holds topk labels; --mode score scores a samples label set"):
        run(GenerateConfig(teacher=tiny_teacher, inputs=(str(topk_labels),), out=str(tmp_path / "x"), mode="score",
                           progress=False, device="cpu"))
    samples = tmp_path / "samples"
    with ShardWriter(samples, "samples", 0, 512, header={"tokenizer": {"fingerprint": "sha256:other"}}) as w:
        w.write({"example_id": "e", "sample_index": 0, "prompt": "p", "prompt_ids": [1, 2], "completion": "c",
                 "completion_ids": [3], "completion_logprobs": [-1.0], "finish_reason": "stop", "seed": 0})
    with pytest.raises(InputError, match="written with another tokenizer than the teacher's"):
        run(GenerateConfig(teacher=tiny_teacher, inputs=(str(samples),), out=str(tmp_path / "y"), mode="score",
                           progress=False, device="cpu"))
    assert not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="--mode score reads one samples label set, got 2 inputs"):
        GenerateConfig(teacher=tiny_teacher, inputs=("a", "b"), out="o", mode="score")


def test_opd_refuses_completions_not_drawn_at_temperature_1(tiny_teacher, corpus, tmp_path, student_config):
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "prompts.jsonl"),), out=str(tmp_path / "samples"),
                       mode="sample", prompt_field="prompt", n=1, max_new_tokens=4, temperature=0.7, progress=False,
                       device="cpu"))
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(tmp_path / "samples"),), out=str(tmp_path / "scored"),
                       mode="score", k=4, progress=False, device="cpu"))
    p = subprocess.run([sys.executable, "-m", "student_train.cli", "train", "--labels", str(tmp_path / "scored"),
                        "--student-config", student_config, "--out", str(tmp_path / "o"), "--loss", "opd",
                        "--max-steps", "1", "--device", "cpu", "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "drawn at temperature 0.7, top-p 0.95" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_opd_loss_is_the_policy_gradient_plus_weighted_forward_kl_and_needs_scored_labels(rng):
    from student_train import losses
    from student_train.config import TrainConfig
    from student_train.objective import step_terms
    from types import SimpleNamespace
    from student_train.objective import check_labels
    rows = [scored_row(rng, "a", 3, 4, 50, 4)]
    batch = collate(columns_from_rows(rows), "scored")
    logits = torch.randn(1, 6, 50, requires_grad=True)
    kw = dict(labels=("l",), out="o", student="s", loss="opd")
    n = batch["mask"].sum()
    both = step_terms(logits, batch, cfg=TrainConfig(**kw, opd_forward_kl=0.5), alpha=0.0, n=n)
    pg, _ = losses.on_policy_kd(logits, batch["targets"], batch["teacher_logprob"], batch["sampling_logprob"],
                                batch["mask"], clip=0.2)
    fkl = losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], batch["coverage"], batch["mask"], tail="tail")
    assert both["kd"].item() == pytest.approx(pg.item() + 0.5 * fkl.item(), rel=1e-6)
    assert both["objective"] is both["kd"]   # alpha 0: CE is only measured
    assert set(both) >= {"staleness", "clipped", "advantage", "forward_kl", "policy_gradient"}
    only = step_terms(logits, batch, cfg=TrainConfig(**kw, opd_forward_kl=0.0), alpha=0.0, n=n)["kd"]
    assert only.item() == pytest.approx(pg.item(), rel=1e-6)
    with pytest.raises(FormatError, match="--loss opd needs scored labels"):
        check_labels(TrainConfig(**kw), [SimpleNamespace(kind="topk", k=8, dir="l", manifest={})])
    with pytest.raises(ValueError, match="--opd-clip: must be in"):
        TrainConfig(**kw, opd_clip=1.5)


def rounds_cmd(*args):
    return subprocess.run([sys.executable, "-m", "student_train.cli", "rounds", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_rounds_sample_score_train_from_each_rounds_student_and_a_rerun_is_cached(tiny_teacher, corpus, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    student = tmp_path / "student"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=512, vocab_size=len(tok), tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id)).save_pretrained(student)
    tok.save_pretrained(student)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"class Widget{i}:"}) + "\n" for i in range(3)))
    args = ["--teacher", tiny_teacher, "--student", str(student), "--prompts", str(corpus / "prompts.jsonl"),
            "--eval-prompts", str(held), "--out", str(tmp_path / "r"), "--rounds", "2", "--n", "2",
            "--max-new-tokens", "6", "--k", "8", "--max-steps", "2", "--batch-size", "4", "--log-every", "1",
            "--device", "cpu", "--no-progress"]
    p = rounds_cmd(*args)
    assert p.returncode == 0, p.stderr
    log = [json.loads(x) for x in (tmp_path / "r" / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in log] == [0, 1] and all(x["completions"] == 10 for x in log)
    assert all("staleness" in x and "clipped" in x and x["eval"]["tokens"] > 0 for x in log)
    # Round 1 samples from round 0's student; every round's labels carry their round.
    second = fmt.read_manifest(tmp_path / "r" / "round-001" / "samples")
    assert second["config"]["teacher"].endswith(os.path.join("round-000", "train", "step_000002"))
    assert {r["round"] for r in ShardReader(tmp_path / "r" / "round-001" / "scored").rows()} == {1}
    assert (tmp_path / "r" / "round-001" / "train" / "step_000002" / "model.safetensors").is_file()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*.parquet")}
    again = rounds_cmd(*args, "--batch-tokens", "4096")   # how it runs may change; what it makes may not
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*.parquet")} == before   # nothing redone
    changed = rounds_cmd(*args, "--lr", "1e-3")
    assert changed.returncode == 2 and "holds rounds run with other settings (changed: lr)" in changed.stderr


def test_a_cut_round_resumes_its_training_and_the_log_matches_an_uncut_run(tiny_teacher, corpus, tmp_path):
    from student_train.config import RoundsConfig
    from student_train.rounds import run_rounds
    kw = dict(teacher=tiny_teacher, student=tiny_teacher, prompts=(str(corpus / "prompts.jsonl"),), rounds=1, n=1,
              max_new_tokens=5, k=4, max_steps=3, batch_size=2, progress=False, device="cpu", sampler="teacher",
              loss="kd", log_every=1, save_every=1)
    whole = run_rounds(RoundsConfig(out=str(tmp_path / "a"), **kw))
    cut = RoundsConfig(out=str(tmp_path / "b"), **kw)
    run_rounds(cut)
    # Cut it back to round 0's training after step 1, as a preemption would leave it.
    import shutil
    train = tmp_path / "b" / "round-000" / "train"
    for step in (2, 3):
        shutil.rmtree(train / f"step_{step:06d}")
    (tmp_path / "b" / "round-000" / "round.json").unlink()
    lines = (train / "metrics.jsonl").read_text().splitlines()
    (train / "metrics.jsonl").write_text("\n".join(lines[:1]) + "\n")
    resumed = run_rounds(cut)
    a, b = whole["rounds"][0], resumed["rounds"][0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5) and math.isfinite(a["train_loss"])
