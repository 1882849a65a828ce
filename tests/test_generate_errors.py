import json

import pytest
from typer.testing import CliRunner

from labelgen.cli import app

runner = CliRunner()


@pytest.fixture
def bad_inputs(tmp_path):
    good = json.dumps({"text": "def f(x):\n    return x\n"})
    files = {
        "invalid_json.jsonl": f"{good}\n{{not json\n{good}\n",
        "missing_field.jsonl": f"{good}\n{json.dumps({'body': 'x'})}\n",
        "empty_text.jsonl": f"{json.dumps({'text': '   '})}\n",
        "long_prompt.jsonl": json.dumps({"prompt": "x = 1\n" * 600}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "not_utf8.jsonl").write_bytes(good.encode() + b"\n" + good.encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    return tmp_path


def gen(tiny_teacher, tmp_path, *extra):
    return runner.invoke(app, ["generate", "--teacher", tiny_teacher, "--out", str(tmp_path / "out"), "--no-progress",
                               "--k", "8", *extra])


@pytest.mark.parametrize("name, extra, message", [
    ("nope.jsonl", [], r"nope.jsonl: no such file or directory \(--input\)"),
    ("invalid_json.jsonl", [], r"invalid_json.jsonl:2: invalid JSON"),
    ("not_utf8.jsonl", [], r"not_utf8.jsonl:3: not valid UTF-8"),
    ("missing_field.jsonl", [], r"missing_field.jsonl:2: no field 'text'"),
    ("empty_text.jsonl", [], r"empty_text.jsonl:1: field 'text' is empty"),
    ("long_prompt.jsonl", ["--mode", "greedy", "--prompt-field", "prompt"], r"long_prompt.jsonl:1: prompt has \d+ tokens; .* exceeds the teacher's 512 positions"),
])
def test_bad_input_fails_with_one_line_naming_file_and_line(tiny_teacher, bad_inputs, name, extra, message):
    r = gen(tiny_teacher, bad_inputs, "--input", str(bad_inputs / name), *extra)
    assert r.exit_code == 2, r.output
    err = [l for l in r.stderr.splitlines() if l.startswith("labelgen: error:")]
    assert len(err) == 1 and __import__("re").search(message, err[0]), r.stderr
    assert "Traceback" not in r.output
    assert not (bad_inputs / "out" / "manifest.json").exists()
    assert not list((bad_inputs / "out").glob("*.parquet")) if (bad_inputs / "out").exists() else True


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "/no/such/teacher"], r"--teacher: /no/such/teacher is not a model directory"),
    (["--k", "1000"], r"--k 1000 is larger than the teacher's vocabulary \(512\)"),
    (["--mode", "beam"], r"--mode: must be one of topk, sampled, sample, greedy, tokens"),
    (["--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    (["--max-seq-len", "4096", "--batch-tokens", "4096"], r"--max-seq-len 4096 exceeds the teacher's 512 positions"),
    (["--encoding", "zstd_level=40"], r"zstd_level must be in \[1, 22\]"),
])
def test_bad_options_fail_with_one_line_naming_the_option(tiny_teacher, corpus, tmp_path, extra, message):
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), *extra)
    assert r.exit_code == 2, r.output
    assert __import__("re").search(message, r.stderr), r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_skips_and_counts_bad_records(tiny_teacher, bad_inputs):
    r = gen(tiny_teacher, bad_inputs, "--input", str(bad_inputs / "invalid_json.jsonl"),
            "--input", str(bad_inputs / "not_utf8.jsonl"), "--skip-bad")
    assert r.exit_code == 0, r.output
    m = json.loads((bad_inputs / "out" / "manifest.json").read_text())
    assert m["counts"]["skipped"] == 2 and m["counts"]["examples"] == 6 and m["counts"]["rows"] == 4
    # A resume that finds every shard finished still reports the skips (kept in each shard's footer).
    (bad_inputs / "out" / "manifest.json").unlink()
    r = gen(tiny_teacher, bad_inputs, "--input", str(bad_inputs / "invalid_json.jsonl"),
            "--input", str(bad_inputs / "not_utf8.jsonl"), "--skip-bad", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((bad_inputs / "out" / "manifest.json").read_text())["counts"] == m["counts"]


def test_a_non_empty_foreign_output_directory_is_refused(tiny_teacher, corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"))
    assert r.exit_code == 2 and "is not empty and holds no labelgen run" in r.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
