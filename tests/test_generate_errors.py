import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from labelgen import format as fmt
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
    (["--teacher", "/no/such/teacher"], r"--teacher: /no/such/teacher: no such directory"),
    (["--teacher", "HuggingFaceTB/SmolLM2-135M"], r"--teacher: HuggingFaceTB/SmolLM2-135M is no directory here; .*"
                                                  r"`hf download HuggingFaceTB/SmolLM2-135M --local-dir DIR` "
                                                  r"once, then --teacher DIR"),
    (["--k", "1000"], r"--k 1000 is larger than the teacher's vocabulary \(512\)"),
    (["--mode", "beam"], r"--mode: must be one of topk, sampled, sample, greedy, tokens"),
    (["--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    (["--max-seq-len", "4096", "--batch-tokens", "4096"], r"--max-seq-len 4096 exceeds the teacher's 512 positions"),
    (["--encoding", "zstd_level=40"], r"zstd_level must be in \[1, 22\]"),
    (["--keep-mass", "0"], r"--keep-mass: must be in \(0, 1\]"),
    (["--mode", "sampled", "--min-prob", "0.01"], r"--keep-mass/--min-prob: adaptive truncation is for --mode topk"),
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


def zst_inputs(tmp_path):
    import zstandard
    lines = "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 3}) + "\n" for i in range(40)).encode()
    half = len(lines) // 2
    whole = zstandard.ZstdCompressor().compress(lines[:half]) + zstandard.ZstdCompressor().compress(lines[half:])
    (tmp_path / "cut_frames.jsonl.zst").write_bytes(whole[:-9])            # the last of two frames cut short
    (tmp_path / "cut_single.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines)[:120])
    return tmp_path


@pytest.mark.parametrize("name", ["cut_frames.jsonl.zst", "cut_single.jsonl.zst"])
def test_a_truncated_compressed_input_stops_the_run_naming_the_file(tiny_teacher, tmp_path, name):
    zst_inputs(tmp_path)
    r = gen(tiny_teacher, tmp_path, "--input", str(tmp_path / name))
    assert r.exit_code == 2, r.output
    assert re.search(rf"{name}: compressed stream ends inside a frame \(truncated file\?\)", r.stderr), r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "out" / "manifest.json").exists()


def test_a_truncated_compressed_input_is_counted_under_skip_bad(tiny_teacher, tmp_path):
    zst_inputs(tmp_path)
    r = gen(tiny_teacher, tmp_path, "--input", str(tmp_path / "cut_frames.jsonl.zst"), "--skip-bad")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["counts"]["skipped"] >= 1 and 20 <= m["counts"]["rows"] < 40


def test_an_input_with_no_records_is_an_error_and_a_rerun_after_fixing_it_works(tiny_teacher, corpus, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    r = gen(tiny_teacher, tmp_path, "--input", str(tmp_path / "empty.jsonl"))
    assert r.exit_code == 2 and "no input records (--input); nothing to label" in r.stderr, r.output
    assert not (tmp_path / "out" / "manifest.json").exists()
    shutil.copy(corpus / "docs.jsonl", tmp_path / "empty.jsonl")
    r = gen(tiny_teacher, tmp_path, "--input", str(tmp_path / "empty.jsonl"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "manifest.json").exists()


def test_resume_after_a_config_change_says_what_overwrite_would_delete(tiny_teacher, corpus, tmp_path):
    assert gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl")).exit_code == 0
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), "--k", "4", "--resume")
    assert r.exit_code == 2 and re.search(r"changed: k\).*--overwrite to delete its \d+ finished shard", r.stderr), r.stderr


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_teacher_without_usable_weights_fails_with_one_line(tiny_teacher, corpus, tmp_path, damage):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = teacher / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    r = gen(str(teacher), tmp_path, "--input", str(corpus / "docs.jsonl"))
    assert r.exit_code == 2, r.output
    assert re.search(r"--teacher: cannot load the model in .*teacher", r.stderr) and "Traceback" not in r.output


def test_a_tokenizer_asking_for_remote_code_never_runs_it(tiny_teacher, corpus, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    marker = tmp_path / "code_ran"
    (teacher / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((teacher / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (teacher / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["generate", "--teacher", str(teacher), "--out", str(tmp_path / "out"), "--no-progress",
                            "--k", "8", "--input", str(corpus / "docs.jsonl")], input="y\ny\n")
    assert not marker.exists(), "code from the teacher's directory ran"
    assert "Traceback" not in r.output


def test_resume_accepts_the_same_run_spelled_differently(tiny_teacher, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(corpus / "docs.jsonl", tmp_path / "docs.jsonl")
    assert gen(tiny_teacher, tmp_path, "--input", "docs.jsonl", "--rows-per-shard", "8").exit_code == 0
    first = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (tmp_path / "out" / "manifest.json").unlink()
    r = runner.invoke(app, ["generate", "--teacher", tiny_teacher, "--out", str(tmp_path / "out") + "/", "--no-progress",
                            "--k", "8", "--input", str(tmp_path / "docs.jsonl"), "--rows-per-shard", "8", "--resume"])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert again["fingerprint"] == first["fingerprint"]   # every shard was kept, none redone differently


def test_a_tokenizer_dir_symlinked_out_of_the_label_set_is_not_written_through(tiny_teacher, corpus, tmp_path):
    assert gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl")).exit_code == 0
    (tmp_path / "out" / "manifest.json").unlink()
    shutil.rmtree(tmp_path / "out" / "tokenizer")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "tokenizer").symlink_to(tmp_path / "elsewhere")
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), "--resume")
    assert r.exit_code == 2 and "tokenizer: is a symlink; refusing to write through it" in r.stderr, r.output
    assert not list((tmp_path / "elsewhere").iterdir())


def test_resume_refuses_an_input_that_changed_since_the_run_began(tiny_teacher, corpus, tmp_path):
    shutil.copy(corpus / "docs.jsonl", tmp_path / "docs.jsonl")
    assert gen(tiny_teacher, tmp_path, "--input", str(tmp_path / "docs.jsonl")).exit_code == 0
    (tmp_path / "out" / "manifest.json").unlink()
    with open(tmp_path / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "def appended(): pass\n"}) + "\n")
    r = gen(tiny_teacher, tmp_path, "--input", str(tmp_path / "docs.jsonl"), "--resume")
    assert r.exit_code == 2 and re.search(r"docs.jsonl changed \(size or modification time\) since this run started", r.stderr)


def test_resume_refuses_a_run_begun_by_a_labelgen_writing_another_format(tiny_teacher, corpus, tmp_path):
    """Its finished shards hold another layout (1.3: float32 coverage): one label set must not mix two."""
    assert gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl")).exit_code == 0
    (tmp_path / "out" / "manifest.json").unlink()
    run_file = tmp_path / "out" / "run.json"
    started = json.loads(run_file.read_text())
    del started["format_version"]   # run.json as labelgen 1.3 wrote it
    run_file.write_text(json.dumps(started))
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), "--resume")
    assert r.exit_code == 2 and re.search(r"started by a labelgen writing format 1.3 or older, this one writes "
                                          + re.escape(fmt.FORMAT_VERSION) + r"; finish it with that version, or pass --overwrite to delete its \d+ finished",
                                          r.stderr), r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_resume_finishes_a_run_begun_by_the_release_before_whose_shards_this_one_writes_alike(
        tiny_teacher, corpus, tmp_path, chats):
    """2.2 and 2.3 wrote the shards 2.4 writes (2.4 added only chat marks): a run one of them began is finished
    to the set an uninterrupted run makes; a chat run, whose shards would now carry marks, is still refused."""
    assert gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), "--rows-per-shard", "4").exit_code == 0
    whole = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(whole["shards"]) > 1
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / whole["shards"][-1]["name"]).unlink()
    run_file = tmp_path / "out" / "run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "format_version": "2.2"}))
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), "--rows-per-shard", "4", "--resume")
    assert r.exit_code == 0, r.output
    resumed = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert resumed["fingerprint"] == whole["fingerprint"] and resumed["format_version"] == fmt.FORMAT_VERSION
    chat = ["--input", str(chats), "--messages-field", "messages", "--out", str(tmp_path / "chat")]
    assert gen(tiny_teacher, tmp_path, *chat).exit_code == 0
    (tmp_path / "chat" / "manifest.json").unlink()
    run_file = tmp_path / "chat" / "run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "format_version": "2.3"}))
    r = gen(tiny_teacher, tmp_path, *chat, "--resume")
    assert r.exit_code == 2 and "started by a labelgen writing format 2.3" in r.stderr, r.output


def test_skip_bad_with_every_record_bad_is_an_error_not_an_empty_label_set(tiny_teacher, bad_inputs, tmp_path):
    (tmp_path / "all_bad.jsonl").write_text("{not json\n" + json.dumps({"body": "x"}) + "\n")
    r = gen(tiny_teacher, tmp_path, "--input", str(tmp_path / "all_bad.jsonl"), "--skip-bad")
    assert r.exit_code == 2 and "all 2 input record(s) were bad and skipped (--skip-bad); nothing to label" in r.stderr, r.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_overwrite_through_a_symlinked_out_replaces_the_labels_and_keeps_the_link(tiny_teacher, corpus, tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk")
    assert gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl")).exit_code == 0
    r = gen(tiny_teacher, tmp_path, "--input", str(corpus / "docs.jsonl"), "--k", "4", "--overwrite")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert (tmp_path / "out").is_symlink()
    assert json.loads((tmp_path / "disk" / "manifest.json").read_text())["k"] == 4


@pytest.fixture(scope="module")
def samples_set(tiny_teacher, corpus, tmp_path_factory):
    from labelgen.generate import GenerateConfig, run
    out = tmp_path_factory.mktemp("samples") / "s"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "prompts.jsonl"),), out=str(out), mode="sample",
                       prompt_field="prompt", n=1, max_new_tokens=4, progress=False, device="cpu"))
    return out


# What a job refuses before it loads its teacher, by mode and backend: --dry-run refuses the same, in the same line.
REFUSED = {("sampled", "vllm"): "--mode sampled needs --backend hf"}


@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("mode", ["topk", "sampled", "sample", "greedy", "tokens", "score"])
def test_dry_run_refuses_what_the_job_would_refuse_before_loading_its_teacher(mode, backend, tiny_teacher, corpus,
                                                                               samples_set, tmp_path):
    inputs = {"score": str(samples_set), "sample": str(corpus / "prompts.jsonl"),
              "greedy": str(corpus / "prompts.jsonl")}.get(mode, str(corpus / "docs.jsonl"))
    args = ["generate", "--teacher", tiny_teacher, "--input", inputs, "--out", str(tmp_path / "o"), "--mode", mode,
            "--backend", backend, "--no-progress", "--device", "cpu"]
    args += ["--prompt-field", "prompt"] if mode in ("sample", "greedy") else []
    r = runner.invoke(app, [*args, "--dry-run"])
    if (mode, backend) in REFUSED:
        assert r.exit_code == 2 and REFUSED[mode, backend] in r.output, r.output
        job = runner.invoke(app, args)   # the real job: the same line, and nothing written
        assert job.exit_code == 2 and r.stderr == job.stderr and not (tmp_path / "o").exists(), job.output
    else:
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["max_seq_len"] is not None
