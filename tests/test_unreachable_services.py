"""Stores and clusters that are not there or never answer: a Ray address
with nothing listening (or something that is not Ray), gs:// without
credentials, S3 with wrong credentials, a store that accepts and stays
silent (bounded by a deadline, stopped by a signal with exit 75), and leases:
from the future, lost, waited for."""

import json
import os
import subprocess
import sys

import pytest
from helpers import BUCKET, one_line_error

from labelgen.errors import InUse


def test_a_ray_address_with_nothing_listening_is_one_line_not_a_hang(tiny_teacher, corpus, tmp_path):
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        r = subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                            str(corpus / "docs.jsonl"), "--out", str(tmp_path / "l"), "--num-workers", "2",
                            "--no-progress", "--ray", address], capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr
        assert f"--ray {address}: no Ray cluster answers there" in one_line_error(r.stderr, "labelgen")


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


@pytest.fixture
def silent_metadata_server(tmp_path):
    """A Google metadata server on loopback that accepts connections and never
    answers: without credentials the GCS client asks it, and waits."""
    from helpers import silent_server
    with silent_server() as (port, accepted):
        env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
        where = f"127.0.0.1:{port}"   # pyarrow's client reads the first, google-auth the other two
        env.update(GCE_METADATA_ROOT=where, GCE_METADATA_HOST=where, GCE_METADATA_IP=where,
                   CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
        yield env, accepted


def test_gs_without_credentials_is_one_line_within_seconds_not_a_quarter_hour(silent_metadata_server):
    env, _ = silent_metadata_server
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "validate", "gs://nob/x"], capture_output=True, text=True,
                       env={**env, "LABELGEN_STORE_TIMEOUT": "3"}, timeout=600)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "labelgen")
    assert line.startswith("labelgen: error: gs://nob/x") and "no answer in 3 s" in line and "credentials" in line, line


def test_a_signal_stops_a_run_waiting_on_a_store_that_does_not_answer(silent_metadata_server, tiny_teacher, corpus):
    import signal
    import time
    env, accepted = silent_metadata_server
    proc = subprocess.Popen([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                             str(corpus / "docs.jsonl"), "--out", "gs://nob/x", "--no-progress", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not accepted and proc.poll() is None:   # waiting on the store now
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)   # far above the fraction of a second it takes
    assert proc.returncode == 75, err
    assert one_line_error(err, "labelgen") == "labelgen: stopped by SIGTERM; finished shards are kept: rerun the same command with --resume to continue"


def test_wrong_s3_credentials_are_one_line_naming_what_is_wrong(tiny_teacher, corpus, tmp_path):
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # moto's server checking credentials: it knows no access key until one is created.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        for _ in range(600):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "nobody",
               "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_REGION": "us-east-1", "LABELGEN_CACHE": str(tmp_path / "cache")}
        r = subprocess.run([sys.executable, "-m", "labelgen.cli", "validate", "s3://labels/x"], capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 2 and "access denied: check the credentials" in one_line_error(r.stderr, "labelgen")
        r = subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                            str(corpus / "docs.jsonl"), "--out", "s3://labels/x", "--no-progress", "--device", "cpu"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 2, r.stderr
        assert "does not know this S3 access key (AWS_ACCESS_KEY_ID)" in one_line_error(r.stderr, "labelgen")
    finally:
        server.terminate()
        server.wait()


def lease_object(renewed: float, ttl: float, **extra) -> bytes:
    return json.dumps({"holder": "x", "host": "elsewhere", "machine": "elsewhere", "pid": 1, "command": "labelgen x",
                       "renewed": renewed, "ttl": ttl, **extra}).encode()


def test_a_lease_from_the_future_or_with_a_huge_ttl_does_not_hold_a_prefix_forever(s3, capfd):
    import time

    from labelgen.run.lease import Lease
    from labelgen.store import storage
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

    from labelgen.run.lease import Lease
    from labelgen.store import storage
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
