"""`labelgen generate --ray`: the worker units as Ray tasks on a local Ray
cluster (one per test session), against the same units run by hand."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from labelgen import format as fmt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False,
             configure_logging=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    """Enough text that a unit takes a few seconds: a unit can be killed mid-shard."""
    from labelgen.tools.demo import read_corpus
    path = tmp_path_factory.mktemp("ray_corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t[:2500]}) + "\n"
                            for i, t in enumerate(read_corpus(None, 3_000_000)[:150])))
    return path


def config(teacher, inputs, out, n, **kw):
    from labelgen.generate.config import GenerateConfig
    # Teacher batches of 8 windows and row groups of 8 rows: a shard in progress is on disk as .tmp from its
    # first batch to its last (with one big batch per shard it would exist only while being written out).
    return GenerateConfig(teacher=teacher, inputs=(str(inputs),), out=str(out), k=8, max_seq_len=64, rows_per_shard=5,
                          batch_tokens=512, encoding={"row_group_rows": 8}, progress=False, device="cpu",
                          num_workers=n, **kw)


def rows(label_dir):
    from labelgen.shards import ShardReader
    out = []
    for r in ShardReader(label_dir).rows():
        out.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()})
    return sorted(out, key=lambda r: (r[fmt.EXAMPLE_ID], r[fmt.WINDOW_OFFSET]))


@pytest.fixture(scope="module")
def by_hand(tiny_teacher, many_docs, tmp_path_factory):
    """The same 3 units run one after another with --worker i/3, then finalize."""
    from labelgen.generate.finalize import finalize
    from labelgen.generate import run
    out = tmp_path_factory.mktemp("by_hand") / "labels"
    for i in range(3):
        run(config(tiny_teacher, many_docs, out, 3, worker_index=i))
    finalize(out)
    return out


def test_units_on_ray_equal_the_units_run_by_hand(ray_cluster, tiny_teacher, many_docs, by_hand, tmp_path):
    from labelgen.generate.ray_units import RayConfig, run_on_ray
    m = run_on_ray(config(tiny_teacher, many_docs, tmp_path / "labels", 3), RayConfig(address="auto"))
    assert m["counts"]["rows"] == json.loads((by_hand / "manifest.json").read_text())["counts"]["rows"]
    assert rows(tmp_path / "labels") == rows(by_hand)
    from labelgen.tools.inspection import validate
    assert validate(tmp_path / "labels")["ok"]


def test_a_unit_killed_mid_shard_is_rerun_by_ray_and_resumes_to_the_same_set(ray_cluster, tiny_teacher, many_docs,
                                                                               by_hand, tmp_path):
    from labelgen.generate.ray_units import RayConfig, run_on_ray
    out = tmp_path / "labels"
    result, killed = {}, []

    def drive():
        try:
            result["manifest"] = run_on_ray(config(tiny_teacher, many_docs, out, 3), RayConfig(address="auto"))
        except BaseException as e:   # noqa: BLE001  (reported by the assertion below)
            result["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    lock = out / "labelgen.worker-1-of-3.lock"
    partial = out / fmt.partial_manifest_name(1, 3)
    mine = [fmt.shard_name(i) for i in range(1, 200, 3)]
    pid = None
    while driver.is_alive() and not killed and not partial.exists():
        if pid is None:
            try:
                pid = json.loads(lock.read_text())["pid"]   # unit 1 has started
            except (ValueError, KeyError, OSError):
                time.sleep(0.005)
                continue
        # Freeze it, look, and kill it only while a shard of it is on disk unfinished (race-free while stopped).
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            break
        in_flight = [n for n in mine if (out / (n + ".tmp")).is_file()]
        if in_flight:
            os.kill(pid, signal.SIGKILL)   # the unit's Ray worker process, mid-shard
            killed.append((pid, in_flight[0]))
        else:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.005)
    driver.join()
    assert killed, "unit 1 finished before it could be killed; give it more input"
    assert "error" not in result, result.get("error")
    # Rerun in a new process (not the killed one), from its finished shards, to the same labels.
    assert json.loads(lock.read_text())["pid"] != killed[0][0]
    assert rows(out) == rows(by_hand)


def test_a_unit_with_bad_input_fails_the_run_with_one_line_naming_it(ray_cluster, tiny_teacher, tmp_path):
    lines = [json.dumps({"id": f"p{i}", "text": "def f(x):\n    return x + %d\n" % i}) for i in range(15)]
    lines[12] = '{"id": "bad", "text": '   # shard 2 (rows 10-14): unit 2 of 3
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher,
                        "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "labels"), "--k", "4",
                        "--max-seq-len", "64", "--rows-per-shard", "5", "--num-workers", "3", "--device", "cpu",
                        "--no-progress", "--ray", "auto"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("labelgen:")]
    assert len(err) == 1 and err[0].startswith("labelgen: error: unit 2 of 3 failed: ") and "in.jsonl:13" in err[0], r.stderr
    assert not (tmp_path / "labels" / "manifest.json").exists()


def test_after_a_unit_fails_on_its_input_the_fixed_input_reruns_keeping_the_finished_units(ray_cluster, tiny_teacher,
                                                                                         tmp_path):
    lines = [json.dumps({"id": f"p{i}", "text": "def f(x):\n    return x + %d\n" % i}) for i in range(15)]
    bad = list(lines)
    bad[12] = '{"id": "bad", "text": '   # shard 2: unit 2 of 3
    (tmp_path / "in.jsonl").write_text("\n".join(bad) + "\n")
    cmd = [sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input", str(tmp_path / "in.jsonl"),
           "--out", str(tmp_path / "labels"), "--k", "4", "--max-seq-len", "64", "--rows-per-shard", "5",
           "--num-workers", "3", "--device", "cpu", "--no-progress", "--ray", "auto"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "--inputs-changed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Unhandled" not in r.stderr, r.stderr
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    # The same command: refused, saying what to do, deleting nothing.
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "labels").glob("shard-*.parquet")}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "changed (size or modification time)" in r.stderr and "--inputs-changed" in r.stderr
    assert "--overwrite" not in r.stderr and "Traceback" not in r.stderr and "Unhandled" not in r.stderr, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "labels").glob("shard-*.parquet")} == kept
    r = subprocess.run(cmd + ["--inputs-changed"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "labels").glob("shard-*.parquet")}
    assert kept and all(now[name] == t for name, t in kept.items())   # finished before: not redone
    ids = [r[fmt.EXAMPLE_ID] for r in rows(tmp_path / "labels")]
    assert len(now) == 3 and len(ids) == 15 and any(i.endswith("in.jsonl:13") for i in ids)
