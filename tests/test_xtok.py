"""Cross-tokenizer distillation: alignment on hand-checked tokenizations,
and a student with its own tokenizer trained from the labels."""

import json

import numpy as np
import pytest
import torch

from student_train.xtok import CrossTokenizer, token_bytes


def bpe(merges: list[tuple[str, str]]):
    """A byte-level BPE tokenizer with exactly these merges (and <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(["<s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


# "é" is the two bytes C3 A9, written Ã© in the byte-level alphabet; Ġ is a space.
TEACHER = bpe([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"), ("Ġ", "w"), ("Ġw", "o"),
               ("Ġwo", "r"), ("l", "d"), ("Ã", "©")])
STUDENT = bpe([("h", "e"), ("Ġ", "he"), ("Ġhe", "l"), ("l", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
               ("Ġwor", "l"), ("Ġworl", "d")])


def tokens(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def test_token_bytes_reads_byte_level_pieces_and_gives_specials_none():
    b = token_bytes(TEACHER)
    assert b[TEACHER.convert_tokens_to_ids("Ġhello")] == b" hello"
    assert b[TEACHER.convert_tokens_to_ids("Ã©")] == "é".encode()
    assert b[TEACHER.convert_tokens_to_ids("Ã")] == b"\xc3"
    assert b[TEACHER.bos_token_id] == b""


def test_alignment_on_hand_checked_tokenizations():
    x = CrossTokenizer(TEACHER, STUDENT)
    t_ids = [TEACHER.bos_token_id] + TEACHER("hello hello world é", add_special_tokens=False)["input_ids"]
    assert tokens(TEACHER, t_ids) == ["<s>", "hello", "Ġhello", "Ġwor", "ld", "Ġ", "Ã©"]
    s_ids, lengths, label, source = x.window(np.asarray(t_ids))
    assert tokens(STUDENT, s_ids) == ["he", "l", "lo", "Ġhel", "lo", "Ġworld", "Ġ", "Ã", "©"]
    assert lengths.tolist() == [2, 1, 2, 4, 2, 6, 1, 1, 1]
    # Student position s predicts student token s+1; it is labelled by the teacher position predicting the
    # teacher token that starts at the same byte, or -1.
    #   "l" (byte 2) and "lo" (byte 3) start inside the teacher's "hello": none.
    #   "Ġhel" starts with the teacher's "Ġhello" (byte 5, teacher position 1); its "lo" starts inside: none.
    #   "Ġworld" starts with "Ġwor" (teacher position 2) and spans the teacher's "ld" too.
    #   "Ġ" starts with "Ġ" (position 4); "Ã" (byte C3) starts with "Ã©" (position 5); "©" starts inside it.
    assert label.tolist() == [-1, -1, 1, -1, 2, 4, 5, -1]
    # The teacher token each student token's first byte belongs to (what chat marks are read through): "he", "l",
    # "lo" begin in "hello" (1, not the text-less <s> before it), "Ġhel" and "lo" in "Ġhello", "Ġworld" in "Ġwor",
    # "Ġ" in "Ġ", and both bytes of "é" in "Ã©".
    assert source.tolist() == [1, 1, 1, 2, 2, 3, 5, 6, 6]


def test_candidates_map_to_the_student_token_their_text_begins_with():
    x = CrossTokenizer(TEACHER, STUDENT)
    m = {t: x.map[TEACHER.convert_tokens_to_ids(t)] for t in ("Ġhello", "hello", "Ġwor", "ld", "Ã©", "Ã", "Ġ")}
    assert tokens(STUDENT, [m["Ġhello"], m["hello"], m["Ġwor"], m["ld"], m["Ã©"], m["Ã"], m["Ġ"]]) == \
        ["Ġhel", "he", "Ġwor", "l", "Ã", "Ã", "Ġ"]   # a lone lead byte has no text: matched by its bytes
    assert x.map[TEACHER.bos_token_id] == -1          # a special token stands for no text: its mass joins the tail


def test_merged_labels_keep_the_mass_of_candidates_that_meet_on_one_student_token():
    """Teacher candidates "ld" and "l" both begin with the student's "l":
    their probabilities add up on it; <s> maps to nothing and its mass joins
    the tail."""
    from labelgen import format as fmt
    x = CrossTokenizer(TEACHER, STUDENT)
    t_ids = np.asarray([TEACHER.bos_token_id] + TEACHER("hello hello", add_special_tokens=False)["input_ids"])
    cand = [TEACHER.convert_tokens_to_ids(t) for t in ("Ġhello", "ld", "l", "<s>")]
    p = np.array([0.5, 0.2, 0.1, 0.05])
    P = len(t_ids) - 1
    columns = {fmt.INPUT_IDS: (t_ids, np.array([0, len(t_ids)])),
               fmt.TOPK_IDS: (np.tile(cand, (P, 1)), np.array([0, P])),
               fmt.TOPK_LOGPROBS: (np.log(np.tile(p, (P, 1))).astype(np.float32), np.array([0, P])),
               fmt.COVERAGE: (np.full(P, p.sum(), np.float32), np.array([0, P]))}
    batch = x.collate(columns, None, None, None)
    assert batch["kd_mask"][0].tolist() == [False, False, True, False]   # only "Ġhel" meets a teacher boundary
    got = {STUDENT.convert_ids_to_tokens(int(i)): float(np.exp(lp))
           for i, lp in zip(batch["topk_ids"][0, 2], batch["topk_logprobs"][0, 2]) if np.isfinite(lp)}
    assert got == pytest.approx({"Ġhel": 0.5, "l": 0.3})
    assert batch["coverage"][0, 2].item() == pytest.approx(0.8)
    assert batch["target_bytes"][0].tolist() == [1, 2, 4, 2]


def sampled_columns(t_ids: np.ndarray, cand: list[int], counts: list[int], coverage: float,
                    logprobs: np.ndarray | None = None) -> dict:
    """One row of sampled labels drawing the same ids at every position."""
    from labelgen import format as fmt
    P, n = len(t_ids) - 1, len(cand)
    return {fmt.INPUT_IDS: (t_ids, np.array([0, len(t_ids)])),
            fmt.SAMPLED_IDS: (np.tile(cand, P), np.array([0, P * n])),
            fmt.SAMPLED_COUNTS: (np.tile(counts, P), np.array([0, P * n])),
            fmt.SAMPLED_LENGTHS: (np.full(P, n), np.array([0, P])),
            fmt.SAMPLED_LOGPROBS: (np.tile(logprobs, P).astype(np.float32) if logprobs is not None
                                   else np.zeros(0, np.float32), np.array([0, 0 if logprobs is None else P * n])),
            fmt.COVERAGE: (np.full(P, coverage, np.float32), np.array([0, P]))}


def test_merged_sampled_labels_keep_the_weight_of_draws_that_meet_on_one_student_token():
    """Draws of "ld" and "l" add up on the student's "l"; a draw of <s> has
    no student token: its weight is dropped (the estimator), and for the tail
    bucket its share of the teacher's mass on the drawn ids goes to the
    bucket (by counts), or its exact mass where the set stores logprobs."""
    x = CrossTokenizer(TEACHER, STUDENT)
    t_ids = np.asarray([TEACHER.bos_token_id] + TEACHER("hello hello", add_special_tokens=False)["input_ids"])
    cand = [TEACHER.convert_tokens_to_ids(t) for t in ("Ġhello", "ld", "l", "<s>")]
    p = np.array([0.5, 0.2, 0.1, 0.05])   # the teacher's exact probabilities of the drawn ids
    batch = x.collate(sampled_columns(t_ids, cand, [6, 2, 1, 1], p.sum()), None, None, None)
    assert batch["kd_mask"][0].tolist() == [False, False, True, False]   # only "Ġhel" meets a teacher boundary

    def at(b, key):
        return {STUDENT.convert_ids_to_tokens(int(i)): float(v)
                for i, v, w in zip(b["sampled_ids"][0, 2], b[key][0, 2], b["sampled_weights"][0, 2]) if w > 0}
    assert at(batch, "sampled_weights") == pytest.approx({"Ġhel": 0.6, "l": 0.3})
    assert "sampled_logprobs" not in batch
    assert batch["sampled_coverage"][0, 2].item() == pytest.approx(0.85 * 0.9)
    exact = x.collate(sampled_columns(t_ids, cand, [6, 2, 1, 1], p.sum(), np.log(p)), None, None, None)
    assert {k: np.exp(v) for k, v in at(exact, "sampled_logprobs").items()} == pytest.approx({"Ġhel": 0.5, "l": 0.3})
    assert exact["sampled_coverage"][0, 2].item() == pytest.approx(0.8)


def test_with_the_same_tokenizer_cross_tokenizer_sampled_batches_are_the_plain_ones(tiny_teacher, corpus, tmp_path):
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    from student_train.data import LabelStream, open_label_sets
    from student_train.vocab import load_tokenizer_for
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "s"),
                       mode="sampled", draws=12, max_seq_len=64, rows_per_shard=8, progress=False, device="cpu",
                       encoding={"sampled_coverage": True}))
    readers = open_label_sets([str(tmp_path / "s")])
    tok = load_tokenizer_for(None, readers[0].dir)
    plain = next(iter(LabelStream(readers, 8, shuffle=False)))[0]
    x = CrossTokenizer(tok, tok)
    cross = next(iter(LabelStream(readers, 8, shuffle=False, cross=x)))[0]
    checked = 0
    for i in range(8):
        for s in np.flatnonzero(cross["kd_mask"][i].numpy()):
            t = np.flatnonzero(plain["targets"][i].numpy() == int(cross["targets"][i, s]))

            def drawn(b, j, mapped=False):   # mapped: through the candidate map, as the student sees them
                out = {}
                for a, w in zip(b["sampled_ids"][i, j].tolist(), b["sampled_weights"][i, j].tolist()):
                    a = int(x.map[a]) if mapped else a
                    if w > 0 and a >= 0:
                        out[a] = out.get(a, 0.0) + w
                return out
            got = drawn(cross, s)
            match = [u for u in t if drawn(plain, u, mapped=True) == pytest.approx(got)]
            assert match, (i, s)
            cov = cross["sampled_coverage"][i, s].item()
            assert any(cov == pytest.approx(plain["sampled_coverage"][i, u].item() * sum(got.values()), rel=1e-5)
                       for u in match)
            checked += 1
    assert checked >= 0.95 * plain["mask"].sum().item() - 8


def test_a_student_with_its_own_tokenizer_trains_from_sampled_labels(tiny_teacher, corpus, student_config,
                                                                     topk_labels, tmp_path):
    """The estimator and the tail bucket, from the command line."""
    from typer.testing import CliRunner
    from labelgen.generate.config import GenerateConfig
    from labelgen.tools.demo import train_tokenizer
    from labelgen.generate import run
    from student_train.cli import app
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "s"),
                       mode="sampled", draws=12, max_seq_len=64, rows_per_shard=8, progress=False, device="cpu",
                       encoding={"sampled_coverage": True}))
    texts = [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")]
    train_tokenizer(texts[::-1], 384).save_pretrained(tmp_path / "tok")
    common = ["train", "--labels", str(tmp_path / "s"), "--eval-labels", str(topk_labels), "--max-steps", "8",
              "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "8", "--eval-batches", "4",
              "--save-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu", "--student-config",
              student_config, "--student-tokenizer", str(tmp_path / "tok")]
    for name, extra in (("estimator", []), ("tail", ["--tail", "tail"])):
        r = CliRunner().invoke(app, common + ["--out", str(tmp_path / name)] + extra)
        assert r.exit_code == 0, r.output
        m = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert m[-1]["eval_bpb"] < m[0]["eval_bpb"] and m[-1]["kd"] > 0, name


def test_a_window_of_special_tokens_only_gives_an_empty_row():
    from labelgen import format as fmt
    x = CrossTokenizer(TEACHER, STUDENT)
    t_ids = np.asarray([TEACHER.bos_token_id, TEACHER.bos_token_id])
    columns = {fmt.INPUT_IDS: (t_ids, np.array([0, 2])), fmt.TOPK_IDS: (np.zeros((1, 2), np.int64), np.array([0, 1])),
               fmt.TOPK_LOGPROBS: (np.zeros((1, 2), np.float32), np.array([0, 1])),
               fmt.COVERAGE: (np.ones(1, np.float32), np.array([0, 1]))}
    batch = x.collate(columns, None, None, None)
    assert not batch["mask"].any() and not batch["kd_mask"].any()


def test_the_same_tokenizer_aligns_almost_everywhere_with_the_teachers_own_labels(topk_labels):
    from student_train.data import LabelStream, open_label_sets
    from student_train.vocab import load_tokenizer_for
    readers = open_label_sets([str(topk_labels)])
    tok = load_tokenizer_for(None, readers[0].dir)
    x = CrossTokenizer(tok, tok)
    named = np.flatnonzero([len(b) > 0 for b in x.teacher_bytes])
    assert np.mean(x.map[named] == named) > 0.99
    plain = next(iter(LabelStream(readers, 8, shuffle=False)))[0]
    cross = next(iter(LabelStream(readers, 8, shuffle=False, cross=x)))[0]
    assert cross["kd_mask"].sum() >= 0.95 * plain["mask"].sum() - 8   # less the BOS each first window starts with
    for i in range(8):
        for s in np.flatnonzero(cross["kd_mask"][i].numpy())[:20]:
            target = int(cross["targets"][i, s])
            t = np.flatnonzero(plain["targets"][i].numpy() == target)   # the plain row's position with that target
            got = {int(a): float(b) for a, b in zip(cross["topk_ids"][i, s], cross["topk_logprobs"][i, s]) if b > -1e9}
            assert any(got == pytest.approx({int(a): float(b) for a, b in zip(plain["topk_ids"][i, u],
                                                                            plain["topk_logprobs"][i, u])})
                       for u in t)


def test_a_student_with_its_own_tokenizer_trains_from_the_labels_and_reports_bits_per_byte(
        topk_labels, corpus, student_config, tmp_path):
    """From the command line; the flag is named where a mismatched tokenizer is refused."""
    from typer.testing import CliRunner
    from labelgen.tools.demo import train_tokenizer
    from student_train.cli import app
    texts = [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")]
    train_tokenizer(texts[::-1], 384).save_pretrained(tmp_path / "tok")   # other data, other size
    common = ["train", "--labels", str(topk_labels), "--max-steps", "8", "--batch-size", "4", "--lr", "3e-3",
              "--warmup-steps", "2", "--eval-holdout", "1", "--eval-every", "8", "--eval-batches", "4",
              "--save-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu"]
    from transformers import AutoTokenizer
    from student_train.runtime import build_model
    own = AutoTokenizer.from_pretrained(tmp_path / "tok")
    build_model(None, student_config, own, 0).save_pretrained(tmp_path / "student")
    own.save_pretrained(tmp_path / "student")
    r = CliRunner().invoke(app, common + ["--out", str(tmp_path / "refused"), "--student", str(tmp_path / "student")])
    assert r.exit_code == 2 and "pass --student-tokenizer DIR" in r.output
    r = CliRunner().invoke(app, common + ["--out", str(tmp_path / "kd"), "--ce-weight", "0.5", "--student-config",
                                          student_config, "--student-tokenizer", str(tmp_path / "tok")])
    assert r.exit_code == 0, r.output
    m = [json.loads(line) for line in open(tmp_path / "kd" / "metrics.jsonl")]
    assert m[-1]["eval_bpb"] < m[0]["eval_bpb"] and 0 < m[-1]["eval_bpb"] < 20
    assert m[-1]["kd"] > 0 and list((tmp_path / "kd").glob("candidate_map-*.npy"))
    saved = AutoTokenizer.from_pretrained(tmp_path / "kd" / "step_000008")
    assert len(saved) == len(AutoTokenizer.from_pretrained(tmp_path / "tok"))   # the student's own tokenizer


def test_the_trainer_api_distills_across_tokenizers_with_the_same_batches_and_loss(topk_labels, corpus,
                                                                                  student_config, tmp_path):
    from transformers import AutoTokenizer, TrainingArguments
    from labelgen.tools.demo import train_tokenizer
    from student_train.config import TrainConfig
    from student_train.data import LabelStream, open_label_sets
    from student_train.hf import DistillLoss, DistillTrainer, LabelDataset
    from student_train.runtime import build_model
    from student_train.train import micro_step
    from student_train.vocab import load_tokenizer_for
    texts = [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")]
    train_tokenizer(texts[::-1], 384).save_pretrained(tmp_path / "tok")
    student_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    readers = open_label_sets([str(topk_labels)])
    x = CrossTokenizer(load_tokenizer_for(None, readers[0].dir), student_tok)
    batch, _ = next(iter(LabelStream(readers, 4, shuffle=False, cross=x)))
    data = LabelDataset(str(topk_labels), shuffle=False, student_tokenizer=str(tmp_path / "tok"))
    model = build_model(None, student_config, student_tok, 0)
    trainer = DistillTrainer(model=model, args=TrainingArguments(str(tmp_path / "hf"), max_steps=2, report_to=[],
                                                                 use_cpu=True, per_device_train_batch_size=4),
                             train_dataset=data, processing_class=student_tok, loss=DistillLoss(ce_weight=0.5))
    hf_batch = trainer.data_collator([e for _, e in zip(range(4), data)])
    for key, value in batch.items():
        torch.testing.assert_close(hf_batch[key], value, rtol=0, atol=0, msg=key)
    cfg = TrainConfig(labels=(str(topk_labels),), out="unused", student_config=student_config, ce_weight=0.5,
                      student_tokenizer=str(tmp_path / "tok"))
    with torch.no_grad():
        ours = micro_step({"student": model}, batch, 0.5, lambda objective: None, cfg=cfg)["loss"]
        assert trainer.compute_loss(model, hf_batch).item() == pytest.approx(ours.item(), rel=1e-6)
    assert trainer.train().global_step == 2


def _npy(array) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_a_damaged_or_hostile_cached_candidate_map_is_rebuilt_never_trusted(tmp_path):
    fresh = CrossTokenizer(TEACHER, STUDENT).map
    CrossTokenizer(TEACHER, STUDENT, tmp_path)
    [cached] = tmp_path.glob("candidate_map-*.npy")
    good = cached.read_bytes()
    V = len(fresh)
    huge_header = _npy(fresh).replace(f"({V},)".encode(), b"(100000000000,)".ljust(len(f"({V},)")))
    cases = {
        "other values": _npy(np.roll(fresh, 1)),
        "values 10^12": _npy(np.full(V, 10**12, np.int64)),
        "float": _npy(fresh.astype(np.float64)),
        "uint8": _npy(fresh.astype(np.uint8)),
        "bool": _npy(fresh.astype(bool)),
        "2-D": _npy(np.stack([fresh, fresh])),
        "0-d": _npy(np.int64(3)),
        "header claims 10^11 entries": huge_header[: len(good)],
        "truncated": good[: len(good) // 2],
        "not npy": b"garbage" * 10,
        "empty": b"",
    }
    for name, data in cases.items():
        cached.write_bytes(data)
        x = CrossTokenizer(TEACHER, STUDENT, tmp_path)
        np.testing.assert_array_equal(x.map, fresh, err_msg=name)
        assert cached.read_bytes() == good, name   # rebuilt and cached again
    rng = np.random.default_rng(3)
    for case in range(100):   # random damage: bytes flipped (header or values), cut short, or grown
        data = bytearray(good)
        if case % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        elif case % 3 == 1:
            data += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        for at in rng.integers(0, max(len(data), 1), int(rng.integers(1, 4))):
            if len(data):
                data[at] ^= int(rng.integers(1, 256))
        cached.write_bytes(bytes(data))
        np.testing.assert_array_equal(CrossTokenizer(TEACHER, STUDENT, tmp_path).map, fresh, err_msg=str(case))
    cached.with_suffix(".sha256").unlink()   # a map without its hash is rebuilt too
    cached.write_bytes(_npy(np.roll(fresh, 1)))
    np.testing.assert_array_equal(CrossTokenizer(TEACHER, STUDENT, tmp_path).map, fresh)


def test_cross_tokenizer_positions_without_a_teacher_label_keep_their_full_ce_weight():
    """alpha * CE + (1 - alpha) * KD where the teacher labels a position, CE where it does not:
    mixing over every position halved (at alpha 0.5; at alpha 0, removed) the only signal of the
    positions inside teacher tokens, and cross-tokenizer KD ended worse than CE only."""
    from student_train.config import TrainConfig
    from student_train.losses import cross_entropy, topk_kd
    from student_train.objective import loss_step
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            from types import SimpleNamespace
            return SimpleNamespace(logits=torch.cat([logits, torch.zeros(2, 1, 11)], 1))
    lp = torch.log_softmax(torch.randn(2, 5, 11, generator=g), -1).topk(4, -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    labelled = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "targets": torch.randint(0, 11, (2, 5), generator=g), "mask": mask, "kd_mask": labelled,
             "topk_ids": lp.indices, "topk_logprobs": lp.values, "coverage": lp.values.exp().sum(-1)}
    cfg = TrainConfig(labels=("l",), student_config="s.json", out="o", ce_weight=0.0)
    kd = loss_step(Fixed(), batch, cfg, alpha=0.0)["kd"]
    unlabelled = mask & ~labelled
    kd_part = topk_kd(logits, lp.indices, lp.values, batch["coverage"], labelled, tail="tail") * labelled.sum()
    ce_part = cross_entropy(logits, batch["targets"], unlabelled) * unlabelled.sum()
    assert kd.item() == pytest.approx(((kd_part + ce_part) / mask.sum()).item(), rel=1e-6)
    kd.backward()
    grad = logits.grad.abs().sum(-1)
    assert (grad[unlabelled] > 0).all() and (grad[~mask] == 0).all()   # alpha 0 still trains the unlabelled positions
