"""What is refused before anything is written, in one line: a manifest whose
row counts disagree with its shards, sampled coverage that disagrees with
the drawn ids' logprobs, a JSON key repeated in an imported record,
`--head-chunk-mb` that is not a finite number; an output holding no
labelgen run gets no lock file, `--overwrite` spares what labelgen did not
write; rounds takes the --skip-bad its errors suggest."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import BUCKET, generate_by_workers, one_line_error, write_jsonl
from typer.testing import CliRunner

from labelgen import format as fmt
from labelgen.tools.inspection import validate

runner = CliRunner()


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


@pytest.mark.parametrize("coverage,ok", [(None, True), (0.0, False), (1.0, False)])
def test_validate_checks_sampled_coverage_against_the_drawn_ids_logprobs(coverage, ok, tmp_path):
    from labelgen.format import Encoding
    from labelgen.shards import ShardWriter
    logprobs = np.log(np.array([0.01, 0.006, 0.004], np.float32))   # the drawn ids hold 0.02 of the mass
    row = {fmt.EXAMPLE_ID: "a", fmt.WINDOW_OFFSET: 0, fmt.INPUT_IDS: np.array([1, 2, 3]),
           fmt.SAMPLED_LENGTHS: np.array([2, 1]), fmt.SAMPLED_IDS: np.array([4, 9, 7]),
           fmt.SAMPLED_COUNTS: np.array([3, 1, 4]), fmt.SAMPLED_LOGPROBS: logprobs,
           fmt.COVERAGE: np.array([0.016, 0.004] if coverage is None else [coverage, 0.004], np.float32)}
    with ShardWriter(tmp_path / "s", "sampled", 4, 16, encoding=Encoding(sampled_coverage=True, id_map="none")) as w:
        w.write(row)
    report = validate(str(tmp_path / "s"))
    assert report["ok"] == ok, report
    if not ok:
        assert "coverage differs from the sum of exp(drawn ids' logprobs)" in report["problems"][0]["problem"]


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


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_head_chunk_mb_must_be_a_finite_number_and_nothing_is_written(value, topk_labels, student_config, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "student_train.cli", "train", "--labels", str(topk_labels),
                        "--student-config", student_config, "--out", str(out), "--head-chunk-mb", value,
                        "--no-progress", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert one_line_error(r.stderr, "student-train") == "student-train: error: --head-chunk-mb: must be >= 0 (0: the " \
                                                         f"model's full logits), got {float(value)}", r.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def records(corpus):
    docs = [json.loads(line) for line in open(corpus / "docs.jsonl")]
    return [{"text": d["text"][:120 + 10 * i]} for i, d in enumerate(docs[:9])]


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["plain", "symlink", "climbing"])
def test_a_refused_output_holding_no_labelgen_run_gets_no_lock_file(spelling, tiny_teacher, corpus, tmp_path):
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "data.csv").write_text("a,b\n")
    out = {"plain": theirs, "climbing": theirs / "sub" / "..", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        out.symlink_to(theirs)
    for extra in ([], ["--overwrite"]):
        r = subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                            str(corpus / "docs.jsonl"), "--out", str(out), "--no-progress", "--device", "cpu", *extra],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and "no labelgen run" in one_line_error(r.stderr, "labelgen"), r.stderr
        assert sorted(p.name for p in theirs.iterdir()) == ["data.csv", "sub"]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_overwrite_spares_a_foreign_file_inside_the_tokenizer_directory(store, records, tiny_teacher, tmp_path, request):
    from labelgen.store import storage
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records[:3])
    out = f"s3://{BUCKET}/spare" if store == "s3" and request.getfixturevalue("s3") else str(tmp_path / "labels")
    generate_by_workers(tiny_teacher, inp, out, 1)
    notes = storage.location(out) / fmt.TOKENIZER_DIR / "NOTES.md"
    storage.write_bytes(notes, b"mine")
    generate_by_workers(tiny_teacher, inp, out, 1, overwrite=True)
    assert storage.read_text(notes) == "mine"
    assert validate(out)["ok"]
    names = {p.name for p in storage.list_dir(storage.location(out) / fmt.TOKENIZER_DIR)}
    assert {"tokenizer.json", "NOTES.md"} <= names


def test_rounds_takes_the_skip_bad_its_errors_suggest(tmp_path):
    from student_train.cli import app
    r = runner.invoke(app, ["rounds", "--teacher", "t", "--student", "s", "--prompts", "p.jsonl", "--out",
                            str(tmp_path / "r"), "--skip-bad", "--dry-run"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skip_bad"] is True, r.output
    from student_train.config import RoundsConfig
    from student_train.rounds import EXECUTION_ONLY
    assert "skip_bad" in EXECUTION_ONLY and RoundsConfig(teacher="t", student="s", prompts=("p",), out="o").skip_bad is False


def test_a_setting_given_twice_in_a_config_file_is_refused_naming_file_and_line(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a run.yaml with `lr` twice would train at one of them."""
    from labelgen.errors import OptionError
    from labelgen.settings import config_from_sources
    from student_train.config import TrainConfig
    path = tmp_path / "run.yaml"
    path.write_text("labels: [labels/]\nout: runs/a\nlr: 0.001\nmax_steps: 10\nlr: 0.01\n")
    with pytest.raises(OptionError, match=re.escape(f"{path}:5: setting 'lr' is given twice (lines 3 and 5): keep one")):
        config_from_sources(TrainConfig, str(path), {}, tuple_fields=("labels",))
    r = runner.invoke(__import__("student_train.cli", fromlist=["app"]).app, ["train", str(path)])
    assert r.exit_code == 2 and f"{path}:5: setting 'lr' is given twice" in r.output, r.output
