"""`labelgen import`: vLLM prompt_logprobs saved as JSONL -> a label set."""

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from labelgen.cli import app
from helpers import assert_stored_coverage, assert_stored_target_logprob
from labelgen.format import Encoding
from labelgen.shards import ShardReader
from labelgen.tools.inspection import validate

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


def import_lines(tiny_teacher, tmp_path, lines: list[str], name: str = "bad.jsonl", *extra: str):
    (tmp_path / name).write_text("".join(l + "\n" for l in lines))
    return runner.invoke(app, ["import", str(tmp_path / name), "--tokenizer", tiny_teacher, "--k", str(K),
                               "--out", str(tmp_path / "l"), *extra])


def refused_at(r, where: str) -> str:
    """The one error line of a refused import, which names `where` and left no label set."""
    assert r.exit_code == 2, r.output
    errors = [l for l in r.output.splitlines() if l.startswith("labelgen: error:")]
    assert len(errors) == 1 and f"{where}:" in errors[0] and "Traceback" not in r.output, r.output
    return errors[0]


def mutate(line: str, change) -> str:
    obj = json.loads(line)
    change(obj)
    return json.dumps(obj)


def position(obj, i=3):
    return obj["prompt_logprobs"][i]


def test_an_id_given_twice_in_one_position_is_refused_and_validate_finds_one_stored(vllm_dump, tiny_teacher, tmp_path, rng):
    path, _ = vllm_dump
    clean = path.read_text().splitlines()[0]
    def twice(obj):
        entries = position(obj)
        key = next(iter(entries))
        entries["0" + key] = dict(entries[key])
    error = refused_at(import_lines(tiny_teacher, tmp_path, [clean, mutate(clean, twice)]), "bad.jsonl:2")
    assert "prompt_logprobs[3]: token id" in error and "appears twice" in error
    # A label set holding such a position (written past import's checks) fails validate.
    from helpers import topk_row
    from labelgen.shards import ShardWriter
    row = topk_row(rng, "x", 10, 512, 4)
    row["topk_ids"][2, 1] = row["topk_ids"][2, 0]
    with ShardWriter(tmp_path / "dup", "topk", 4, 512) as w:
        w.write(row)
    report = validate(tmp_path / "dup")
    assert not report["ok"] and "a token id appears twice" in report["problems"][0]["problem"]


@pytest.mark.parametrize("change, message", [
    (lambda o: [e.update(logprob=-0.01) for e in position(o).values()], r"hold probability \d\.\d+, more than 1"),
    (lambda o: position(o).update({"499": {"logprob": float("nan"), "rank": 400}}), r"logprob nan is not a log-probability"),
    (lambda o: position(o).update({str(10**30): {"logprob": -30.0, "rank": 3}}), r"token id outside the tokenizer's vocabulary"),
    (lambda o: position(o).update({"498": {"logprob": -30.0, "rank": 10**30}}), r"rank 1000000000000000000000000000000 is not in \[1, 512\]"),
    (lambda o: o["prompt_token_ids"].__setitem__(2, 10**30), r"prompt_token_ids\[2\] = 10{30} is outside"),
    (lambda o: position(o).update({"497": {"logprob": True}}), r"is not a token id with a logprob"),
])
def test_import_refuses_what_validate_would_refuse_naming_file_and_line(vllm_dump, tiny_teacher, tmp_path, change, message):
    path, _ = vllm_dump
    clean = path.read_text().splitlines()[0]
    error = refused_at(import_lines(tiny_teacher, tmp_path, [clean, mutate(clean, change)]), "bad.jsonl:2")
    assert re.search(message, error), error
    assert not (tmp_path / "l").exists()


def test_a_bad_record_is_reported_at_its_own_line_not_where_the_row_group_flushed(vllm_dump, tiny_teacher, tmp_path):
    path, _ = vllm_dump
    lines = path.read_text().splitlines()
    bad = mutate(lines[2], lambda o: [e.update(logprob=-0.01) for e in position(o, 5).values()])
    many = [lines[n % 6] for n in range(300)]
    many[200] = bad
    refused_at(import_lines(tiny_teacher, tmp_path, many, "many.jsonl", "--rows-per-shard", "1000"), "many.jsonl:201")
    refused_at(import_lines(tiny_teacher, tmp_path, [bad], "one.jsonl"), "one.jsonl:1")


def test_hostile_lines_give_one_line_not_a_traceback(vllm_dump, tiny_teacher, tmp_path, monkeypatch):
    path, _ = vllm_dump
    clean = path.read_text().splitlines()[0]
    deep = "[" * 200_000 + "]" * 200_000
    assert "nested too deeply" in refused_at(import_lines(tiny_teacher, tmp_path, [clean, deep]), "bad.jsonl:2")
    wide = mutate(clean, lambda o: position(o).update({str(100_000 + i): -50.0 for i in range(70_000)}))
    assert "more than any vLLM record holds" in refused_at(import_lines(tiny_teacher, tmp_path, [clean, wide]), "bad.jsonl:2")
    import labelgen.generate.inputs
    monkeypatch.setattr(labelgen.generate.inputs, "MAX_LINE_BYTES", 1 << 20)
    long = mutate(clean, lambda o: o.update(pad="x" * (3 << 20)))
    error = refused_at(import_lines(tiny_teacher, tmp_path, [clean, long, clean]), "bad.jsonl:2")
    assert "line longer than 1 MiB" in error


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_or_blank_file_is_refused_and_writes_no_label_set(tiny_teacher, tmp_path, text):
    (tmp_path / "empty.jsonl").write_text(text)
    r = runner.invoke(app, ["import", str(tmp_path / "empty.jsonl"), "--tokenizer", tiny_teacher, "--k", str(K),
                            "--out", str(tmp_path / "l")])
    assert r.exit_code == 2 and "empty.jsonl: no records (blank or empty); nothing to import" in r.output, r.output
    assert not (tmp_path / "l").exists()


def test_an_import_killed_before_its_manifest_is_started_over_by_the_same_command(vllm_dump, tiny_teacher, tmp_path):
    path, _ = vllm_dump
    args = ["import", str(path), "--tokenizer", tiny_teacher, "--k", str(K), "--out", str(tmp_path / "l"),
            "--rows-per-shard", "2"]
    assert runner.invoke(app, args).exit_code == 0
    whole = json.loads((tmp_path / "l" / "manifest.json").read_text())
    # What kill -9 leaves: shards (one torn), no manifest.
    (tmp_path / "l" / "manifest.json").unlink()
    (tmp_path / "l" / "shard-00002.parquet").write_bytes(b"PAR1 torn")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "an import stopped before its manifest; starting it over" in r.output
    again = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert validate(tmp_path / "l")["ok"]
    # A complete import is not replaced without --overwrite.
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "output directory is not empty; pass --overwrite" in r.output, r.output


def pick(r, options: list):
    return options[int(r.integers(len(options)))]


MUTATIONS = [
    lambda o, r: position(o, r.integers(1, 5)).update({str(r.integers(0, 512)): float(r.uniform(-40, 0))}),
    lambda o, r: position(o, r.integers(1, 5)).update({str(pick(r, [-1, 512, 10**20])): -1.0}),
    lambda o, r: position(o, r.integers(1, 5)).update({"0" + next(iter(position(o, 1))): -1.0}),
    lambda o, r: o["prompt_token_ids"].__setitem__(int(r.integers(0, 5)), int(pick(r, [-5, 512, 2**63, 7]))),
    lambda o, r: o["prompt_logprobs"].__setitem__(int(r.integers(1, 5)), pick(r, [None, 3, "x", [], {}])),
    lambda o, r: o["prompt_logprobs"].pop(),
    lambda o, r: o.pop(str(pick(r, ["prompt_token_ids", "prompt_logprobs", "id"]))),
    lambda o, r: [e.update(logprob=pick(r, [float("nan"), float("inf"), -float("inf"), 0.5, -0.001, -1e9]))
                  for e in list(position(o, r.integers(1, 5)).values())[: int(r.integers(1, 4))] if isinstance(e, dict)],
    lambda o, r: [e.update(rank=pick(r, [0, -1, 10**30, "a", 1.5, True, None])) for e in position(o, 2).values()],
    lambda o, r: o.update(id=pick(r, [None, "", 0, "doc", ["a"]])),
    lambda o, r: o.update(prompt_token_ids=[True, False] * 10),
]


@pytest.mark.slow
def test_fuzzed_jsonl_lines_import_cleanly_or_stop_with_one_line_naming_file_and_line(vllm_dump, tiny_teacher, tmp_path):
    """220 mutated lines (values, ids, ranks, shapes, types, truncated JSON):
    each either imports to a label set that validates, holding what the line
    says, or stops the import with one line naming file:line."""
    path, _ = vllm_dump
    clean = path.read_text().splitlines()[0]
    rng = np.random.default_rng(7)
    outcomes = {"ok": 0, "refused": 0}
    for case in range(220):
        if case % (len(MUTATIONS) + 1) == len(MUTATIONS):
            line = clean[: int(rng.integers(1, len(clean)))]   # cut short
        else:
            obj = json.loads(clean)
            MUTATIONS[case % (len(MUTATIONS) + 1)](obj, rng)
            line = json.dumps(obj)
        case_dir = tmp_path / str(case)
        case_dir.mkdir()
        r = import_lines(tiny_teacher, case_dir, [clean, line], "fuzz.jsonl", "--rows-per-shard", "1")
        if r.exit_code == 0:
            outcomes["ok"] += 1
            report = validate(case_dir / "l")
            assert report["ok"] and report["rows"] == 2, (line[:300], report["problems"])
            row = list(ShardReader(case_dir / "l").rows())[1]
            obj = json.loads(line)
            np.testing.assert_array_equal(row["input_ids"], obj["prompt_token_ids"])
        else:
            outcomes["refused"] += 1
            refused_at(r, "fuzz.jsonl:2")
            assert not (case_dir / "l").exists()
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 100, outcomes
