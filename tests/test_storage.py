"""Label sets read straight from an object store: a real S3 API on localhost
(moto's server mode; its in-process mock does not reach pyarrow's C++ client)."""

import json
import logging
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from labelgen import storage
from labelgen.format import FormatError

BUCKET = "labels"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server and the environment that points pyarrow and boto3 at it."""
    import boto3
    from moto import server as moto_server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.setenv("LABELGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    storage.filesystem.cache_clear()
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"client": client, "env": env}
    storage.filesystem.cache_clear()
    mp.undo()
    server.stop()


def upload(client, local_dir, prefix) -> str:
    for p in sorted(local_dir.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            client.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(local_dir)}")
    return f"s3://{BUCKET}/{prefix}"


def test_a_uri_is_a_store_path_and_a_name_cannot_climb_out():
    p = storage.location("s3://bucket/a/b/")
    assert str(p) == "s3://bucket/a/b" and str(p / "manifest.json") == "s3://bucket/a/b/manifest.json"
    assert storage.location("relative/dir").__class__.__name__ == "PosixPath"
    with pytest.raises(FormatError, match="out of the label directory"):
        p / "../other/shard.parquet"
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        storage.location("ftp://host/x")


def test_inspect_validate_and_the_loader_read_a_label_set_from_the_bucket_as_from_disk(s3, topk_labels):
    from labelgen.inspect import inspect, validate
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
    with pytest.raises(FormatError, match=f"^s3://{BUCKET}/nothing/here/manifest.json: no manifest"):
        ShardReader(f"s3://{BUCKET}/nothing/here")
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "inspect", f"s3://{BUCKET}/nothing/here"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no manifest" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
