"""`labelgen export --to axolotl`: rows Axolotl's KD plugin parses."""

import json
import math
import os
import numpy as np
import pytest
from typer.testing import CliRunner

from labelgen.cli import app
from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.shards import ShardReader

runner = CliRunner()


def axolotl_transform_logprobs(sample: dict, field: str = "logprobs") -> dict:
    """Our reading of ChatTemplateStrategyWithKD.transform_logprobs
    (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/chat_template.py,
    main as of 2026-07-24), step by step: the lists align with the last
    tokens (earlier ones padded with -inf and mask 0); top_k is the smaller
    of the most and the least common list length; each entry's id is parsed
    from "token_id:N"; the kept probabilities are renormalised (kd and
    generation temperature equal); the mask follows labels != -100."""
    logprobs = sample.pop(field)
    seq_len = len(sample["input_ids"])
    pad = seq_len - len(logprobs)
    lengths = [len(row) for row in logprobs if row is not None and len(row)]
    top_k = min(max(set(lengths), key=lengths.count), min(set(lengths), key=lengths.count))
    if pad < 0:
        logprobs, pad = logprobs[:-seq_len], 0
    logprobs = [row[:top_k] for row in logprobs]
    target_logprobs = [[-math.inf] * top_k for _ in range(pad)]
    target_ids = [list(range(top_k)) for _ in range(pad)]
    mask = [[0] * top_k for _ in range(pad)]
    mask += [[0 if sample["labels"][p] == -100 else 1] * top_k for p in range(pad, seq_len)]
    for row in logprobs:
        ids = [int(entry["token"].split(":")[1]) for entry in row]
        p = np.exp(np.array([entry["logprob"] for entry in row], np.float32))
        target_logprobs.append(np.log(p / p.sum()).tolist())
        target_ids.append(ids)
    return {**sample, "target_logprobs": target_logprobs, "target_token_ids": target_ids, "target_mask": mask}


@pytest.fixture(scope="module")
def chats(corpus, tmp_path_factory):
    """Conversations of different lengths, some longer than one 64-token window."""
    texts = [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")][:7]
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            messages = [{"role": "user", "content": f"explain part {i}"},
                        {"role": "assistant", "content": t[: 60 + 45 * i]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_exported_rows_survive_axolotls_parsing_with_the_labelled_distributions(tiny_teacher, chats, tmp_path):
    from transformers import AutoTokenizer
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(chats),), out=str(tmp_path / "labels"), k=16, max_seq_len=64,
                       messages_field="messages", rows_per_shard=3, progress=False, device="cpu"))
    r = runner.invoke(app, ["export", str(tmp_path / "labels"), "--to", "axolotl", str(tmp_path / "kd.jsonl")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in open(tmp_path / "kd.jsonl")]
    conversations = [json.loads(line)["messages"] for line in open(chats)]
    assert [row["messages"] for row in rows] == conversations            # every conversation, in input order
    labelled = {}
    for w in ShardReader(tmp_path / "labels").rows():
        labelled.setdefault(w["example_id"], []).append(w)
    assert max(len(ws) for ws in labelled.values()) >= 3                  # long ones span several windows
    tok = AutoTokenizer.from_pretrained(tmp_path / "labels" / "tokenizer")
    for row, key in zip(rows, sorted(labelled, key=lambda e: int(e.rsplit(":", 1)[1]))):
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        parsed = axolotl_transform_logprobs({"input_ids": ids, "labels": list(ids), "logprobs": row["logprobs"]})
        assert len(parsed["target_token_ids"]) == len(ids) and parsed["target_mask"][0] == [0] * 16
        for j in range(1, len(ids)):   # token j: from the first window that predicts it
            w = min((w for w in labelled[key] if w["window_offset"] < j < w["window_offset"] + len(w["input_ids"])),
                    key=lambda w: w["window_offset"])
            t = j - w["window_offset"] - 1
            assert w["input_ids"][t + 1] == ids[j]
            assert parsed["target_token_ids"][j] == w["topk_ids"][t].tolist()
            p = np.exp(w["topk_logprobs"][t].astype(np.float64))
            np.testing.assert_allclose(parsed["target_logprobs"][j], np.log(p / p.sum()), atol=1e-5)
            assert parsed["target_mask"][j] == [1] * 16


def test_export_refuses_labels_it_cannot_express(tiny_teacher, corpus, chats, tmp_path):
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(tmp_path / "plain"), k=4,
                       max_seq_len=64, progress=False, device="cpu"))
    r = runner.invoke(app, ["export", str(tmp_path / "plain"), "--to", "axolotl", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "not made with --messages-field" in r.output and not (tmp_path / "x.jsonl").exists()
    mine = tmp_path / "chats.jsonl"
    mine.write_bytes(chats.read_bytes())
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(mine),), out=str(tmp_path / "chat"), k=4, max_seq_len=64,
                       messages_field="messages", progress=False, device="cpu"))
    lines = mine.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "something else"}]})
    mine.write_text("\n".join(lines) + "\n")   # edited after the labels were made
    r = runner.invoke(app, ["export", str(tmp_path / "chat"), "--to", "axolotl", str(tmp_path / "y.jsonl")])
    assert r.exit_code == 2 and "chats.jsonl:3: the chat template no longer renders" in r.output
    assert not (tmp_path / "y.jsonl").exists() and not list(tmp_path.glob("y.jsonl*.tmp"))
    r = runner.invoke(app, ["export", str(tmp_path / "chat"), "--to", "trl", str(tmp_path / "z.jsonl")])
    assert r.exit_code == 2 and "--to: unknown target 'trl'" in r.output


@pytest.fixture(scope="module")
def chat_labels(tiny_teacher, chats, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_labels") / "labels"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(chats),), out=str(out), k=4, max_seq_len=64,
                       messages_field="messages", rows_per_shard=3, progress=False, device="cpu"))
    return out


def test_a_symlink_planted_at_the_temporary_file_is_not_written_through(chat_labels, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (tmp_path / f"kd.jsonl.{os.getpid()}.tmp").symlink_to(target)   # the name this process writes through
    r = runner.invoke(app, ["export", str(chat_labels), "--to", "axolotl", str(tmp_path / "kd.jsonl")])
    assert r.exit_code == 0, r.output
    assert target.read_text() == "keep me"
    assert not (tmp_path / "kd.jsonl").is_symlink() and len((tmp_path / "kd.jsonl").read_text().splitlines()) == 7


def test_the_inputs_named_by_another_spelling_or_moved_export_the_same_rows(chat_labels, chats, tmp_path, monkeypatch):
    r = runner.invoke(app, ["export", str(chat_labels), "--to", "axolotl", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 0, r.output
    moved = tmp_path / "elsewhere" / "copy.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(chats.read_bytes())
    monkeypatch.chdir(tmp_path)
    for spelling in (str(chats.resolve()), "elsewhere/copy.jsonl", str(moved)):
        r = runner.invoke(app, ["export", str(chat_labels), "--to", "axolotl", str(tmp_path / "b.jsonl"), "--input", spelling])
        assert r.exit_code == 0, (spelling, r.output)
        assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_export_errors_are_one_short_line(chat_labels, tmp_path):
    (tmp_path / "dir").mkdir()
    r = runner.invoke(app, ["export", str(chat_labels), "--to", "axolotl", str(tmp_path / "dir")])
    assert r.exit_code == 2 and "dir: is a directory; name a file to write" in r.output and "Traceback" not in r.output
    many = tmp_path / "many"
    many.mkdir()
    for i in range(400):
        (many / f"file{i:03d}.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    r = runner.invoke(app, ["export", str(chat_labels), "--to", "axolotl", str(tmp_path / "c.jsonl"), "--input", str(many)])
    assert r.exit_code == 2 and "and 397 more); pass the inputs the labels were made from" in r.output, r.output
    assert len(r.output) < 1000


def test_export_and_estimate_read_the_label_set_from_a_bucket(s3, chat_labels, chats, tmp_path):
    from helpers import upload
    uri = upload(s3["client"], chat_labels, "export/chat")
    for where, out in ((str(chat_labels), "local.jsonl"), (uri, "bucket.jsonl")):
        r = runner.invoke(app, ["export", where, "--to", "axolotl", str(tmp_path / out), "--input", str(chats)])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "bucket.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    r = runner.invoke(app, ["estimate", uri, "--tokens", "1e9", "--vocab", "512", "--k", "4", "--json"])
    assert r.exit_code == 0 and f"measured from {uri}" in r.output, r.output
