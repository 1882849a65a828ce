"""`labelgen import`: vLLM prompt_logprobs saved as JSONL -> a label set."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from labelgen.cli import app
from helpers import assert_stored_coverage, assert_stored_target_logprob
from labelgen.format import Encoding
from labelgen.inspect import validate
from labelgen.shards import ShardReader

runner = CliRunner()
K = 8


@pytest.fixture(scope="module")
def vllm_dump(tiny_teacher, corpus, tmp_path_factory):
    """What a vLLM run with prompt_logprobs=K saves: per position the top K
    (1-based ranks) plus the actual token when it falls outside them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    texts = [json.loads(line)["text"] for line in open(corpus / "docs.jsonl")][:6]
    path = tmp_path_factory.mktemp("vllm") / "prompt_logprobs.jsonl"
    expected = []
    with open(path, "w") as f:
        for n, text in enumerate(texts):
            ids = tok(text)["input_ids"][: 20 + 7 * n]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            plp = [None]
            for i in range(1, len(ids)):
                order = torch.argsort(lp[i - 1], descending=True)
                rank = {int(t): r + 1 for r, t in enumerate(order[:K])}
                rank.setdefault(ids[i], int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1)
                plp.append({str(t): {"logprob": float(lp[i - 1, t]), "rank": r, "decoded_token": tok.decode([t])}
                            for t, r in rank.items()})
            f.write(json.dumps({"id": f"doc{n}", "prompt_token_ids": ids, "prompt_logprobs": plp}) + "\n")
            expected.append((ids, lp))
    return path, expected


def test_vllm_prompt_logprobs_become_a_valid_label_set_that_trains(vllm_dump, tiny_teacher, student_config, tmp_path):
    path, expected = vllm_dump
    r = runner.invoke(app, ["import", str(path), "--tokenizer", tiny_teacher, "--k", str(K), "--out", str(tmp_path / "l"),
                            "--rows-per-shard", "4"])
    assert r.exit_code == 0, r.output
    assert validate(tmp_path / "l")["ok"]
    reader = ShardReader(tmp_path / "l")
    assert reader.kind == "topk" and reader.k == K and len(reader.shards) == 2
    rows = {row["example_id"]: row for row in reader.rows()}
    enc = Encoding.from_dict(reader.manifest["encoding"])
    for n, (ids, lp) in enumerate(expected):
        row = rows[f"doc{n}"]
        np.testing.assert_array_equal(row["input_ids"], ids)
        top = lp[:-1].topk(K, -1)
        # Position t predicts token t + 1: the same entries (rank order up to the codec's ties), each within its error.
        by_id = np.argsort(row["topk_ids"], 1)
        expect = np.argsort(top.indices.numpy(), 1)
        np.testing.assert_array_equal(np.take_along_axis(row["topk_ids"], by_id, 1),
                                      np.take_along_axis(top.indices.numpy(), expect, 1))
        assert enc.error(np.take_along_axis(top.values.numpy(), expect, 1),
                         np.take_along_axis(row["topk_logprobs"], by_id, 1)).max() <= enc.max_error + 1e-6
        assert_stored_coverage(row["coverage"], top.values.exp().sum(-1).numpy())
        actual = lp[np.arange(len(ids) - 1), ids[1:]]
        assert_stored_target_logprob(row["target_logprob"], actual.numpy())
        np.testing.assert_array_equal(row["target_rank"], (lp[:-1] > actual[:, None]).sum(-1).numpy())
    from student_train.config import TrainConfig
    from student_train.train import train
    result = train(TrainConfig(labels=(str(tmp_path / "l"),), student_config=student_config, out=str(tmp_path / "run"),
                               max_steps=2, batch_size=2, warmup_steps=1, eval_every=0, save_every=0, progress=False,
                               device="cpu"))
    assert result["step"] == 2


def test_a_bad_line_stops_the_import_naming_file_and_line_and_leaves_no_manifest(vllm_dump, tiny_teacher, tmp_path):
    path, _ = vllm_dump
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    actual = str(bad["prompt_token_ids"][3])
    del bad["prompt_logprobs"][3][actual]
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    r = runner.invoke(app, ["import", str(tmp_path / "bad.jsonl"), "--tokenizer", tiny_teacher, "--k", str(K),
                            "--out", str(tmp_path / "l")])
    assert r.exit_code == 2
    assert f"bad.jsonl:2: prompt_logprobs[3]: no entry for the actual token {actual}" in r.output
    assert not (tmp_path / "l").exists()   # no shards left behind that look like a start
    r = runner.invoke(app, ["import", str(path), "--tokenizer", tiny_teacher, "--k", "40", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "prompt_logprobs.jsonl:1: prompt_logprobs[1]:" in r.output and "fewer than --k 40" in r.output
