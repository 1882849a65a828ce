"""Hardening, round 4: what a fourth fault probe found. A record deleted from
the input (or inserted, moved, edited) before `--resume --inputs-changed`,
on local disk and in a bucket, with one worker and with two; store calls and
Ray start-up bounded by a deadline and stopped by signals; `--overwrite`
sparing foreign files; leases from the future, lost or waited for; refused
outputs left as they were; `--head-chunk-mb` checked; sampled coverage
checked against the drawn ids' logprobs; a full disk while checkpointing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from labelgen import format as fmt
from labelgen.errors import InUse
from labelgen.generate import run as generate
from labelgen.generate.config import GenerateConfig
from labelgen.generate.finalize import finalize
from labelgen.shards import ShardReader
from labelgen.tools.inspection import validate

from helpers import BUCKET


def one_line_error(stderr: str, program: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{program}:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- 1, 2: --inputs-changed equals a fresh run

EDITS = {
    "delete_end": lambda r: r[:-2],
    "delete_middle": lambda r: r[:4] + r[5:],
    "insert": lambda r: r[:3] + [{"text": "def inserted():\n    return 42\n"}] + r[3:],
    "reorder": lambda r: r[:2] + [r[3], r[2]] + r[4:],
    "edit": lambda r: r[:6] + [{"text": r[6]["text"] + "\n# edited"}] + r[7:],
}


@pytest.fixture(scope="module")
def records(corpus):
    docs = [json.loads(line) for line in open(corpus / "docs.jsonl")]
    return [{"text": d["text"][:120 + 10 * i]} for i, d in enumerate(docs[:9])]


def write_jsonl(path, rows) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.utime(path, ns=(before + 10**9, before + 10**9))   # a new modification time even within one clock tick


def label_rows(where) -> list[dict]:
    return list(ShardReader(where).rows())


def gen(teacher, inp, out, workers: int, **kw) -> None:
    for w in range(workers):
        generate(GenerateConfig(teacher=teacher, inputs=(str(inp),), out=str(out), k=4, max_seq_len=32,
                                rows_per_shard=2, progress=False, device="cpu", num_workers=workers, worker_index=w,
                                **kw))
    if workers > 1:
        finalize(str(out))


@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("change", list(EDITS))
def test_resume_with_inputs_changed_equals_a_fresh_run_on_the_new_input(change, store, workers, records, tiny_teacher,
                                                                         tmp_path, request):
    """Every column of every shard equals a fresh run's: shards past the new
    end are gone from the manifest and the store, no record appears twice."""
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records)
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        out = f"s3://{BUCKET}/changed/{change}-{workers}"
    else:
        out = tmp_path / "labels"
    gen(tiny_teacher, inp, out, workers)
    before = len(ShardReader(out).shards)
    write_jsonl(inp, EDITS[change](records))
    gen(tiny_teacher, inp, out, workers, resume=workers == 1, inputs_changed=True)
    gen(tiny_teacher, inp, tmp_path / "fresh", 1)
    got, want = label_rows(out), label_rows(tmp_path / "fresh")
    assert [r[fmt.EXAMPLE_ID] for r in got] == [r[fmt.EXAMPLE_ID] for r in want]
    for x, y in zip(got, want):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(np.asarray(x[key]), np.asarray(y[key])), (x[fmt.EXAMPLE_ID], key)
    shards = len(ShardReader(out).shards)
    assert shards == len(ShardReader(tmp_path / "fresh").shards)
    if change.startswith("delete"):
        assert shards == before - 1
    report = validate(str(out))   # no shard file or object beyond the manifest's
    assert report["ok"], report["problems"]
    if store == "s3":
        keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=out.split("/", 3)[3] + "/")
                .get("Contents", [])]
        assert sum(k.rsplit("/", 1)[1].startswith("shard-") for k in keys) == shards, keys


def test_finalize_refuses_a_worker_that_finished_before_the_inputs_changed(records, tiny_teacher, tmp_path):
    from labelgen.generate.finalize import unfinished_workers
    inp, out = tmp_path / "in.jsonl", tmp_path / "labels"
    write_jsonl(inp, records)
    gen(tiny_teacher, inp, out, 2)
    write_jsonl(inp, records[:-2])
    generate(GenerateConfig(teacher=tiny_teacher, inputs=(str(inp),), out=str(out), k=4, max_seq_len=32,
                            rows_per_shard=2, progress=False, device="cpu", num_workers=2, worker_index=0,
                            inputs_changed=True))
    assert unfinished_workers(str(out)) == ([1], 2)
    with pytest.raises(fmt.FormatError, match=r"worker\(s\) 1 finished before the inputs changed"):
        finalize(str(out))


# ---------------------------------------------------------------- 3, 4, 6: a store or Ray that accepts and never answers


@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts connections and never answers (helpers.silent_server)."""
    from helpers import silent_server as serve
    with serve() as (port, accepted):
        yield port, accepted


def silent_s3_env(port: int, tmp_path, timeout: float) -> dict:
    return {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "LABELGEN_CACHE": str(tmp_path / "cache"),
            "LABELGEN_STORE_TIMEOUT": str(timeout)}


def commands(tiny_teacher, corpus, topk_labels, student_config, out: str) -> dict[str, list[str]]:
    return {"labelgen": [sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                         str(corpus / "docs.jsonl"), "--out", out, "--no-progress", "--device", "cpu"],
            "student-train": [sys.executable, "-m", "student_train.cli", "train", "--labels", str(topk_labels),
                              "--student-config", student_config, "--out", out, "--max-steps", "2", "--no-progress",
                              "--device", "cpu"]}


@pytest.mark.parametrize("program", ["labelgen", "student-train"])
def test_a_silent_s3_endpoint_fails_the_lease_in_one_line_within_the_deadline(program, silent_server, tiny_teacher,
                                                                               corpus, topk_labels, student_config,
                                                                               tmp_path):
    import time
    port, accepted = silent_server
    cmd = commands(tiny_teacher, corpus, topk_labels, student_config, "s3://bkt/x")[program]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=silent_s3_env(port, tmp_path, 2), timeout=600)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert one_line_error(r.stderr, program) == f"{program}: error: s3://bkt/x/labelgen.lease: no answer in 2 s " \
                                                "($LABELGEN_STORE_TIMEOUT)"
    assert accepted and took < 120, took   # botocore's own timeouts and retries took ~188 s


@pytest.mark.parametrize("program", ["labelgen", "student-train"])
def test_a_signal_stops_a_run_waiting_on_the_lease_with_exit_75(program, silent_server, tiny_teacher, corpus,
                                                                topk_labels, student_config, tmp_path):
    import signal
    import time
    port, accepted = silent_server
    cmd = commands(tiny_teacher, corpus, topk_labels, student_config, "s3://bkt/x")[program]
    proc = subprocess.Popen(cmd, env=silent_s3_env(port, tmp_path, 600), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not accepted and proc.poll() is None:   # waiting on the store now
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert one_line_error(err, program).startswith(f"{program}: stopped by SIGTERM; ")


def test_the_lease_renewal_thread_gives_up_on_a_silent_store_within_its_deadline(silent_server, monkeypatch):
    """The renewal thread calls the store directly (only the main thread waits
    in slices): botocore's own timeouts and retries bound it."""
    import threading
    import time
    from labelgen.store import storage
    port, _ = silent_server
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "LABELGEN_STORE_TIMEOUT": "1"}.items():
        monkeypatch.setenv(key, value)
    storage._boto3_client.cache_clear()
    try:
        outcome = []

        def renew():
            t0 = time.monotonic()
            try:
                storage.write_bytes(storage.location("s3://bkt/x/labelgen.lease"), b"{}", if_match='"tag"')
            except OSError as e:
                outcome.append((time.monotonic() - t0, str(e)))
        t = threading.Thread(target=renew)
        t.start()
        t.join(timeout=300)
        assert outcome and outcome[0][0] < 30, outcome   # 2 attempts of 1 s connect + 1 s read, not 3 x 60 s
    finally:
        storage._boto3_client.cache_clear()


def test_a_port_that_answers_but_is_no_ray_cluster_is_one_line_and_a_signal_exits_75(silent_server, tiny_teacher,
                                                                                     corpus, tmp_path):
    import signal
    import time
    port, accepted = silent_server
    cmd = [sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
           str(corpus / "docs.jsonl"), "--out", str(tmp_path / "l"), "--num-workers", "2", "--no-progress",
           "--ray", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LABELGEN_STORE_TIMEOUT": "3"},
                       timeout=600)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "labelgen")
    assert line.startswith(f"labelgen: error: --ray 127.0.0.1:{port}: something answers there but no Ray cluster "
                           "connected in 3 s"), line
    assert took < 120, took
    proc = subprocess.Popen(cmd, env={**os.environ, "LABELGEN_STORE_TIMEOUT": "300"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = len(accepted)
    while len(accepted) == seen and proc.poll() is None:   # its reachability probe: ray.init comes next
        time.sleep(0.05)
    time.sleep(2)   # inside ray.init by now (or about to be: the handler is the same either way)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert one_line_error(err, "labelgen").startswith("labelgen: stopped by SIGTERM")
    assert time.monotonic() - t0 < 15


# ---------------------------------------------------------------- 5: --overwrite and files labelgen did not write


@pytest.mark.parametrize("store", ["local", "s3"])
def test_overwrite_spares_a_foreign_file_inside_the_tokenizer_directory(store, records, tiny_teacher, tmp_path, request):
    from labelgen.store import storage
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records[:3])
    out = f"s3://{BUCKET}/spare" if store == "s3" and request.getfixturevalue("s3") else str(tmp_path / "labels")
    gen(tiny_teacher, inp, out, 1)
    notes = storage.location(out) / fmt.TOKENIZER_DIR / "NOTES.md"
    storage.write_bytes(notes, b"mine")
    gen(tiny_teacher, inp, out, 1, overwrite=True)
    assert storage.read_text(notes) == "mine"
    assert validate(out)["ok"]
    names = {p.name for p in storage.list_dir(storage.location(out) / fmt.TOKENIZER_DIR)}
    assert {"tokenizer.json", "NOTES.md"} <= names


# ---------------------------------------------------------------- 7, 9, 12: leases from the future, lost, waited for


def lease_object(renewed: float, ttl: float, **extra) -> bytes:
    return json.dumps({"holder": "x", "host": "elsewhere", "machine": "elsewhere", "pid": 1, "command": "labelgen x",
                       "renewed": renewed, "ttl": ttl, **extra}).encode()


def test_a_lease_from_the_future_or_with_a_huge_ttl_does_not_hold_a_prefix_forever(s3, capfd):
    import time
    from labelgen.store import storage
    from labelgen.run.lease import Lease
    where = storage.location(f"s3://{BUCKET}/future/labelgen.lease")
    for renewed, ttl in ((time.time() + 1e12, 60.0), (time.time() - 4000, 1e12)):   # far future; ttl over MAX_TTL
        storage.write_bytes(where, lease_object(renewed, ttl))
        t0 = time.monotonic()
        with Lease(where, ttl=60):
            assert time.monotonic() - t0 < 10
    # A few seconds ahead (a host whose clock is fast): waited for while unchanged, one line saying so, then taken.
    storage.write_bytes(where, lease_object(time.time() + 2.5, 3.0))
    t0 = time.monotonic()
    with Lease(where, ttl=60):
        waited = time.monotonic() - t0
    assert 2.5 < waited < 20, waited
    err = capfd.readouterr().err
    assert "waiting up to 3s for the lease of another labelgen run to expire (pid 1 on elsewhere" in err, err
    assert "in the future by its host's clock" in err and "-" not in err.split("renewed", 1)[1][:3]


@pytest.mark.parametrize("how", ["deleted", "garbage", "taken"])
def test_a_lost_lease_says_what_happened_to_it(how, s3, monkeypatch):
    import time
    from labelgen.store import storage
    from labelgen.run.lease import Lease
    where = storage.location(f"s3://{BUCKET}/lost-{how}/labelgen.lease")
    with Lease(where, ttl=0.6) as lease:   # renewed every 0.1 s
        if how == "deleted":
            storage.delete(where)
        else:
            storage.write_bytes(where, b"not json" if how == "garbage" else lease_object(time.time(), 60.0))
        for _ in range(200):
            if lease.lost:
                break
            time.sleep(0.05)
        with pytest.raises(InUse) as e:
            lease.check()
    said = {"deleted": "its lease object labelgen.lease was deleted",
            "garbage": "its lease object labelgen.lease was overwritten with something that is not a lease",
            "taken": "another run took this output over (pid 1 on elsewhere: labelgen x)"}[how]
    assert f"this run lost its hold on the output: {said}; it stops without committing" in str(e.value)
    assert "stopped renewing" not in str(e.value)


# ---------------------------------------------------------------- 8: a refused output is left as it was


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


# ---------------------------------------------------------------- 10: --head-chunk-mb


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


# ---------------------------------------------------------------- 11: sampled coverage against the drawn ids' logprobs


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


# ---------------------------------------------------------------- a full disk while checkpointing


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1.4 MB: one checkpoint of the conftest student fits (944 KB: weights, AdamW state, tokenizer),
    two do not (root only; elsewhere the test skips, saying so)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"a small filesystem needs root (mount -t tmpfs): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_training_into_a_filesystem_that_fills_mid_checkpoint_keeps_the_last_and_resumes(small_disk, topk_labels,
                                                                                        student_config, tmp_path):
    cmd = [sys.executable, "-m", "student_train.cli", "train", "--labels", str(topk_labels), "--student-config",
           student_config, "--out", str(small_disk / "run"), "--max-steps", "4", "--batch-size", "2",
           "--save-every", "2", "--log-every", "1", "--eval-every", "0", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)   # one checkpoint fits, two do not
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "student-train")
    assert "step_000004: cannot write the checkpoint (no space left on device)" in line, line
    names = sorted(p.name for p in (small_disk / "run").iterdir())
    assert "step_000002" in names and not any(n.startswith(".step") or n == "step_000004" for n in names), names
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(small_disk / "run" / "step_000002").num_parameters() > 0
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)   # room made
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["step"] for line in (small_disk / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
