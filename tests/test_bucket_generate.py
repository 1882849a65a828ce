"""Label sets written straight to an object store by several workers: a real
S3 API on localhost (moto's server mode), one worker killed mid-run and
resumed, finalize, validate, and a student trained from the bucket."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from labelgen.store import storage

from helpers import BUCKET

ROWS_PER_SHARD = 2


def gen_cmd(teacher, corpus, out, worker, *extra):
    # One window per teacher batch: a worker's shards take many steps, so the test can stop it between them.
    return [sys.executable, "-m", "labelgen.cli", "generate", "--teacher", teacher, "--input", str(corpus / "docs.jsonl"),
            "--out", out, "--k", "16", "--max-seq-len", "64", "--batch-tokens", "64", "--rows-per-shard",
            str(ROWS_PER_SHARD), "--num-workers", "2", "--worker-index", str(worker), "--device", "cpu",
            "--no-progress", *extra]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "labelgen.cli", *args], capture_output=True, text=True)


def keys(client, prefix):
    return sorted(o["Key"][len(prefix) + 1:] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
                  .get("Contents", []))


def rows(label_dir):
    from labelgen.shards import ShardReader
    return list(ShardReader(label_dir).rows())


@pytest.mark.slow
def test_two_workers_write_to_a_bucket_one_killed_and_resumed_then_finalize_validate_and_train(
        s3, tiny_teacher, corpus, student_config, tmp_path):
    client, prefix = s3["client"], "gen/topk"
    uri = f"s3://{BUCKET}/{prefix}"
    env = {**os.environ, **s3["env"]}
    # The same run on local disk, for comparison.
    local = tmp_path / "local"
    for w in (0, 1):
        r = subprocess.run(gen_cmd(tiny_teacher, corpus, str(local), w), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert cli("finalize", str(local)).returncode == 0

    # Worker 1 to the bucket, stopped once it has uploaded a shard and recorded it, before it finishes.
    progress = f"{prefix}/progress.worker-0001-of-0002.json"
    proc = subprocess.Popen(gen_cmd(tiny_teacher, corpus, uri, 1), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None and progress[len(prefix) + 1:] not in keys(client, prefix):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)
    there = keys(client, prefix)
    assert "manifest.worker-0001-of-0002.json" not in there, "worker 1 finished before the test could stop it"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = json.loads(client.get_object(Bucket=BUCKET, Key=progress)["Body"].read())["shards"]
    assert recorded and all(i % 2 == 1 for i in map(int, recorded))

    # Nothing can be finalized yet; --missing names worker 1.
    r = cli("finalize", uri)
    assert r.returncode == 2 and "no partial manifests" in r.stderr, r.stderr
    r = cli("finalize", uri, "--missing")
    assert r.returncode == 0 and r.stdout.strip() == "0-1", (r.stdout, r.stderr)

    # Worker 0, then worker 1 again on "another machine" (no staging directory): it keeps what it recorded.
    r = subprocess.run(gen_cmd(tiny_teacher, corpus, uri, 0), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import shutil
    shutil.rmtree(storage.staging_dir(f"{uri}#worker-1-of-2"), ignore_errors=True)
    r = subprocess.run(gen_cmd(tiny_teacher, corpus, uri, 1, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("finalize", uri)
    assert r.returncode == 0, r.stderr

    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())
    names = [s["name"] for s in manifest["shards"]]
    for entry in recorded.values():   # the killed attempt's recorded shards were kept, not redone
        assert entry["shard"]["name"] in names
    # Only listed shards remain (a shard the killed attempt uploaded but had not recorded is gone).
    assert sorted(k for k in keys(client, prefix) if k.startswith("shard-")) == sorted(names)
    r = cli("validate", uri)
    assert r.returncode == 0, r.stdout + r.stderr
    # The decoded labels equal the local run's.
    a, b = rows(local), rows(uri)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(np.asarray(x[key]), np.asarray(y[key])), key
    # A second finalize changes nothing; a finalize that would list other shards is refused.
    assert cli("finalize", uri).returncode == 0

    # A student trained from the bucket equals one trained from disk, and resumes exactly.
    from student_train.config import TrainConfig
    from student_train.train import train

    def fit(labels, out, **kw):
        train(TrainConfig(labels=(labels,), out=str(tmp_path / out), student_config=student_config, max_steps=4,
                          batch_size=4, warmup_steps=1, save_every=2, log_every=1, progress=False, device="cpu", **kw))
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in open(tmp_path / out / "metrics.jsonl")]

    on_disk = fit(str(local), "disk")
    assert fit(uri, "bucket") == on_disk
    shutil.rmtree(tmp_path / "bucket" / "step_000004")
    assert fit(uri, "bucket", resume=True) == on_disk


def test_a_single_worker_writes_a_label_set_to_the_bucket_and_refuses_what_it_should(s3, tiny_teacher, corpus,
                                                                                    tmp_path):
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    uri = f"s3://{BUCKET}/single/topk"

    def cfg(**kw):
        return GenerateConfig(**{**dict(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=uri, k=8,
                                        max_seq_len=64, rows_per_shard=6, progress=False, device="cpu"), **kw})

    m = run(cfg())
    assert [s["name"] for s in m["shards"]] == [s["name"] for s in run(cfg(resume=True))["shards"]]   # done: unchanged
    local = run(cfg(out=str(tmp_path / "local")))
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local["shards"]]
    assert (storage.location(uri) / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match=f"--out: {uri} already holds this run; pass --resume"):
        run(cfg())
    with pytest.raises(ValueError, match=r"--out: .* holds a run with a different config \(changed: k\)"):
        run(cfg(k=4, resume=True))
    # --overwrite starts over under new attempt names
    again = run(cfg(overwrite=True))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    assert {s["name"] for s in again["shards"]}.isdisjoint(s["name"] for s in m["shards"])


def test_manifest_json_in_a_bucket_is_created_once(s3):
    target = storage.location(f"s3://{BUCKET}/once/manifest.json")
    storage.write_bytes(target, b"first", if_absent=True)
    with pytest.raises(storage.AlreadyExists):
        storage.write_bytes(target, b"second", if_absent=True)
    assert target.read_bytes() == b"first"
