"""The run directory (labelgen/rundir.py): what --overwrite may delete, two
hosts on one bucket prefix, a finished bucket set resumed, a bucket training
run's staging directory. Buckets are moto's S3 server on localhost; two
"hosts" are two processes with their own cache (staging) directories."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from labelgen import format as fmt
from labelgen.store import storage

from helpers import BUCKET


def gen_config(teacher, corpus, out, **kw):
    from labelgen.generate.config import GenerateConfig
    return GenerateConfig(**{**dict(teacher=teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(out), k=4,
                                    max_seq_len=64, rows_per_shard=6, progress=False, device="cpu"), **kw})


def keys(client, bucket, prefix=""):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_overwrite_never_deletes_what_labelgen_did_not_write_on_disk(tiny_teacher, corpus, tmp_path):
    from labelgen.generate import run
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "important.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty and holds no labelgen run \(keep\)") as e:
        run(gen_config(tiny_teacher, corpus, out))
    assert "choose another --out" in str(e.value)
    with pytest.raises(ValueError, match=r"--overwrite: .* holds keep, which no labelgen run wrote"):
        run(gen_config(tiny_teacher, corpus, out, overwrite=True))
    assert (out / "keep" / "important.txt").read_text() == "mine"
    # Beside a labelgen run, --overwrite still refuses, and deletes nothing of the run either.
    labels = tmp_path / "labels"
    run(gen_config(tiny_teacher, corpus, labels))
    (labels / "notes.txt").write_text("mine")
    before = sorted(p.name for p in labels.iterdir())
    with pytest.raises(ValueError, match=r"--overwrite: .* holds notes.txt"):
        run(gen_config(tiny_teacher, corpus, labels, k=8, overwrite=True))
    assert sorted(p.name for p in labels.iterdir()) == before
    (labels / "notes.txt").unlink()
    assert run(gen_config(tiny_teacher, corpus, labels, k=8, overwrite=True))["k"] == 8


def test_overwrite_never_deletes_a_bucket_root_or_objects_labelgen_did_not_write(s3, tiny_teacher, corpus):
    from labelgen.generate import run
    client = s3["client"]
    client.create_bucket(Bucket="victim")
    for key in ("a.txt", "sub/b.txt", "sub/c/d.bin"):
        client.put_object(Bucket="victim", Key=key, Body=b"precious")
    for uri in ("s3://victim/sub/..", "s3://victim", "s3://victim/", "s3://victim/x/../../y"):
        with pytest.raises(ValueError, match=r"--out: .*(is a bucket root|climbs with \.\.)"):
            run(gen_config(tiny_teacher, corpus, uri, overwrite=True))
    with pytest.raises(ValueError, match=r"--overwrite: s3://victim/sub holds b.txt and 1 more, which no labelgen run"):
        run(gen_config(tiny_teacher, corpus, "s3://victim/sub", overwrite=True))
    with pytest.raises(ValueError, match="is not empty and holds no labelgen run"):
        run(gen_config(tiny_teacher, corpus, "s3://victim/sub", resume=True))
    assert [k for k in keys(client, "victim") if "labelgen" not in k] == ["a.txt", "sub/b.txt", "sub/c/d.bin"]
    assert not [k for k in keys(client, "victim") if k.endswith(".lease")]   # released


def test_resume_of_a_finished_bucket_set_is_a_no_op_like_on_disk(s3, tiny_teacher, corpus, tmp_path):
    from typer.testing import CliRunner
    from labelgen.cli import app
    uri = f"s3://{BUCKET}/finished/topk"
    args = ["generate", "--teacher", tiny_teacher, "--input", str(corpus / "docs.jsonl"), "--k", "4",
            "--max-seq-len", "64", "--device", "cpu", "--no-progress", "--resume"]
    for out in (uri, str(tmp_path / "local")):
        first = CliRunner().invoke(app, [*args, "--out", out])
        assert first.exit_code == 0, first.output
        manifest = storage.read_text(storage.location(out) / "manifest.json")
        again = CliRunner().invoke(app, [*args, "--out", out])
        assert again.exit_code == 0 and "already complete" in again.output, again.output
        assert storage.read_text(storage.location(out) / "manifest.json") == manifest


@pytest.mark.slow
def test_two_hosts_on_one_bucket_prefix_the_second_is_refused_and_the_first_finishes(s3, tiny_teacher, corpus,
                                                                                    tmp_path):
    prefix = "hosts/topk"
    uri = f"s3://{BUCKET}/{prefix}"

    def host(name, k):
        env = {**os.environ, **s3["env"], "LABELGEN_CACHE": str(tmp_path / name)}
        return [sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                str(corpus / "docs.jsonl"), "--out", uri, "--k", str(k), "--max-seq-len", "64", "--batch-tokens", "64",
                "--rows-per-shard", "2", "--device", "cpu", "--no-progress"], env

    cmd, env = host("a", 8)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while first.poll() is None and f"{prefix}/labelgen.lease" not in keys(s3["client"], BUCKET, prefix):
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)   # holding its lease, in the middle of its run
    try:
        cmd, env = host("b", 4)    # another machine, another config
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate()
    assert second.returncode == 2, second.stderr
    assert f"labelgen: error: {uri}: in use by another labelgen run (pid {first.pid} on " in second.stderr, second.stderr
    assert first.returncode == 0, err[-2000:]
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "validate", uri], env={**os.environ, **s3["env"]},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(storage.read_text(storage.location(uri) / "run.json"))["config"]["k"] == 8
    assert json.loads(storage.read_text(storage.location(uri) / "manifest.json"))["k"] == 8


def test_a_lease_is_refused_while_fresh_and_taken_over_once_expired(s3, monkeypatch):
    from labelgen.run.rundir import Lease
    monkeypatch.setenv("LABELGEN_LEASE_SECONDS", "1.5")
    path = storage.location(f"s3://{BUCKET}/leases/labelgen.lease")
    other = {"holder": "x", "host": "elsewhere", "machine": "elsewhere", "pid": 1, "command": "labelgen generate"}
    storage.write_bytes(path, json.dumps({**other, "renewed": time.time(), "ttl": 1.5}).encode())
    with pytest.raises(Exception, match=r"in use by another labelgen run \(pid 1 on elsewhere"):
        Lease(path).__enter__()
    # Not renewed for 2 periods: waited for until it expires, then taken over.
    storage.write_bytes(path, json.dumps({**other, "renewed": time.time() - 0.6, "ttl": 1.5}).encode())
    t0 = time.time()
    with Lease(path) as lease:
        assert 0.5 < time.time() - t0 < 5
        held = json.loads(storage.read_text(path))
        assert held["pid"] == os.getpid()
        time.sleep(0.6)   # renewed by its thread meanwhile
        assert json.loads(storage.read_text(path))["renewed"] > held["renewed"]
        # Another host takes it over (as after a long pause): this run may commit nothing more.
        storage.write_bytes(path, json.dumps({**other, "renewed": time.time() + 60, "ttl": 1.5}).encode())
        time.sleep(0.6)
        with pytest.raises(Exception, match="another run took this output over"):
            lease.check()
    assert json.loads(storage.read_text(path))["host"] == "elsewhere"   # not deleted: not ours any more


def test_a_bucket_training_run_keeps_only_its_newest_checkpoint_in_staging_and_names_the_bucket(
        s3, topk_labels, student_config, tmp_path):
    from student_train.config import TrainConfig
    from student_train.train import train
    uri = f"s3://{BUCKET}/runs/spot"
    r = train(TrainConfig(labels=(str(topk_labels),), out=uri, student_config=student_config, max_steps=6,
                          batch_size=4, warmup_steps=1, save_every=2, log_every=1, progress=False, device="cpu"))
    assert r["out"] == uri
    staging = storage.staging_dir(uri)
    assert sorted(p.name for p in staging.iterdir() if p.name.startswith("step_")) == ["step_000006"]
    steps = {k.split("/")[2] for k in keys(s3["client"], BUCKET, "runs/spot/") if "/step_" in k}
    assert steps == {"step_000002", "step_000004", "step_000006"}


def test_score_mode_reads_its_samples_from_a_bucket_as_from_disk_and_resumes(s3, tiny_teacher, corpus, tmp_path):
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    from helpers import upload
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "prompts.jsonl"),), out=str(tmp_path / "samples"),
                       mode="sample", prompt_field="prompt", n=2, max_new_tokens=6, progress=False, device="cpu"))
    uri = upload(s3["client"], tmp_path / "samples", "score/samples")

    def score(inputs, out, **kw):
        return run(GenerateConfig(teacher=tiny_teacher, inputs=(inputs,), out=str(tmp_path / out), mode="score", k=4,
                                  rows_per_shard=4, progress=False, device="cpu", **kw))
    import numpy as np
    from labelgen.shards import ShardReader
    local, remote = score(str(tmp_path / "samples"), "a"), score(uri, "b")
    assert remote["counts"] == local["counts"] and remote["counts"]["rows"] == 10
    for x, y in zip(ShardReader(tmp_path / "a").rows(), ShardReader(tmp_path / "b").rows(), strict=True):
        assert all(np.array_equal(np.asarray(x[key]), np.asarray(y[key])) for key in x), x[fmt.EXAMPLE_ID]
    assert remote["config"]["inputs"] == [uri] and remote["scored"]["samples"]["labels"] == uri
    assert score(uri, "b", resume=True)["summary"].get("complete")
