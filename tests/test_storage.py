"""Label sets read straight from an object store: a real S3 API on localhost
(moto's server mode; its in-process mock does not reach pyarrow's C++ client)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from labelgen.errors import OptionError
from labelgen.format import FormatError
from labelgen.store import storage

from helpers import BUCKET, upload


def test_a_uri_is_a_store_path_and_a_name_cannot_climb_out():
    p = storage.location("s3://bucket/a/b/")
    assert str(p) == "s3://bucket/a/b" and str(p / "manifest.json") == "s3://bucket/a/b/manifest.json"
    assert storage.location("relative/dir").__class__.__name__ == "PosixPath"
    with pytest.raises(FormatError, match="out of the label directory"):
        p / "../other/shard.parquet"
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        storage.location("ftp://host/x")


def test_inspect_validate_and_the_loader_read_a_label_set_from_the_bucket_as_from_disk(s3, topk_labels):
    from labelgen.tools.inspection import inspect, validate
    from student_train.data import LabelStream, open_label_sets
    uri = upload(s3["client"], topk_labels, "read/topk")
    local, remote = inspect(topk_labels), inspect(uri)
    assert remote["dir"] == uri
    assert {k: v for k, v in remote.items() if k != "dir"} == {k: v for k, v in local.items() if k != "dir"}
    assert validate(uri) == validate(topk_labels) and validate(uri)["ok"]
    batches = [list(LabelStream(open_label_sets([d], verify=True), 4, seed=3, max_epochs=1)) for d in (topk_labels, uri)]
    assert len(batches[0]) == len(batches[1]) > 0
    for (a, pa), (b, pb) in zip(*batches):
        assert pa == pb and a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "validate", uri], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{uri}: OK"), r.stderr


def test_dataloader_workers_and_label_dataset_stream_from_the_bucket(s3, topk_labels):
    import torch
    from student_train.data import LabelStream, open_label_sets
    from student_train.hf import LabelDataset
    uri = upload(s3["client"], topk_labels, "workers/topk")

    def batches(where, workers):
        stream = LabelStream(open_label_sets([where]), 4, seed=1, max_epochs=1)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return sorted((pos, b["input_ids"].numpy().tobytes()) for b, pos in
                      ((b, json.dumps(p, sort_keys=True)) for b, p in loader))
    assert batches(uri, 2) == batches(str(topk_labels), 2)
    rows = [[r["input_ids"].tolist() for r in LabelDataset(d, shuffle=False)] for d in (uri, str(topk_labels))]
    assert rows[0] == rows[1] and len(rows[0]) > 0


def test_student_train_from_the_bucket_equals_local_and_resumes_exactly(s3, topk_labels, student_config, tmp_path):
    from student_train.config import TrainConfig
    from student_train.train import train
    uri = upload(s3["client"], topk_labels, "train/topk")

    def run(labels, out, steps, **kw):
        train(TrainConfig(labels=(labels,), eval_labels=(labels,), out=str(tmp_path / out), student_config=student_config,
                          max_steps=steps, batch_size=4, warmup_steps=1, eval_every=3, eval_batches=2, save_every=3,
                          log_every=1, progress=False, device="cpu", **kw))
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in open(tmp_path / out / "metrics.jsonl")]

    local = run(str(topk_labels), "local", 6)
    assert run(uri, "remote", 6) == local
    run(uri, "cut", 6)
    shutil.rmtree(tmp_path / "cut" / "step_000006")   # as if stopped after the step-3 checkpoint
    assert run(uri, "cut", 6, resume=True) == local
    # the labels' tokenizer came from the bucket, through the local cache
    assert (tmp_path / "remote" / "step_000006" / "tokenizer.json").is_file()


def test_a_damaged_or_incomplete_set_in_the_bucket_is_one_clear_error_naming_the_object(s3, topk_labels):
    from labelgen.shards import ShardReader
    uri = upload(s3["client"], topk_labels, "bad/topk")
    manifest = json.loads((topk_labels / "manifest.json").read_text())
    first = manifest["shards"][0]["name"]
    s3["client"].put_object(Bucket=BUCKET, Key=f"bad/topk/{first}", Body=b"PAR1 truncated")
    with pytest.raises(FormatError, match=f"^{uri}/{first}: 14 bytes, manifest says"):
        ShardReader(uri).check_files()
    with pytest.raises(OptionError, match=f"^s3://{BUCKET}/nothing/here: no such label set"):
        ShardReader(f"s3://{BUCKET}/nothing/here")
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "inspect", f"s3://{BUCKET}/nothing/here"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such label set" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_student_train_writes_its_run_to_a_bucket_and_a_new_machine_resumes_from_it(s3, topk_labels, student_config,
                                                                                   tmp_path):
    from safetensors.numpy import load
    from student_train.config import TrainConfig
    from student_train.train import train

    def run(out, **kw):
        train(TrainConfig(labels=(str(topk_labels),), out=out, student_config=student_config, max_steps=6, batch_size=4,
                          warmup_steps=1, eval_every=3, eval_batches=2, save_every=3, log_every=1, progress=False,
                          device="cpu", **kw))

    def metrics(text):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in text.splitlines()]

    def remote(key):
        return s3["client"].get_object(Bucket=BUCKET, Key=f"runs/a/{key}")["Body"].read()

    run(str(tmp_path / "local"))
    uri = f"s3://{BUCKET}/runs/a"
    run(uri)
    assert metrics(remote("metrics.jsonl").decode()) == metrics((tmp_path / "local" / "metrics.jsonl").read_text())
    for step in ("step_000003", "step_000006"):
        mine, theirs = load(remote(f"{step}/model.safetensors")), load((tmp_path / "local" / step / "model.safetensors").read_bytes())
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    # Another machine (no staging directory), and the last checkpoint was cut off before its meta.json went up.
    shutil.rmtree(storage.staging_dir(uri))
    s3["client"].delete_object(Bucket=BUCKET, Key="runs/a/step_000006/meta.json")
    run(uri, resume=True)
    assert metrics(remote("metrics.jsonl").decode()) == metrics((tmp_path / "local" / "metrics.jsonl").read_text())
    assert json.loads(remote("step_000006/meta.json"))["step"] == 6
    with pytest.raises(ValueError, match=f"--out: {uri} is not empty; pass --resume"):
        run(uri)
