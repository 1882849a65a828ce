"""Hardening, round 3 (in part): what an unlucky or hostile user met on the
new surfaces: a Ray address with nothing behind it, a shard whose row count
the manifest misstates, a full disk during generation or a checkpoint, a
JSON key repeated in an imported record, rounds' --skip-bad."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from labelgen import format as fmt

runner = CliRunner()


def one_line_error(stderr: str, program: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{program}:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_ray_address_with_nothing_listening_is_one_line_not_a_hang(tiny_teacher, corpus, tmp_path):
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        r = subprocess.run([sys.executable, "-m", "labelgen.cli", "generate", "--teacher", tiny_teacher, "--input",
                            str(corpus / "docs.jsonl"), "--out", str(tmp_path / "l"), "--num-workers", "2",
                            "--no-progress", "--ray", address], capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr
        assert f"--ray {address}: no Ray cluster answers there" in one_line_error(r.stderr, "labelgen")


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


FULL_DISK_AT_WRITE = """
import errno
from labelgen.store import fsutil
_create, written = fsutil.create_fresh, [0]
class Full:
    def __init__(self, f): self.f = f
    def write(self, data):
        written[0] += len(data)
        if written[0] > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")   # as the system says it: no file named
        return self.f.write(data)
    def __getattr__(self, name): return getattr(self.f, name)
fsutil.create_fresh = lambda path, text=False: (Full(_create(path, text)) if str(path).endswith(".parquet.tmp")
                                                else _create(path, text))
"""


def test_a_full_disk_while_a_shard_is_written_names_the_shard(tiny_teacher, corpus, tmp_path):
    code = FULL_DISK_AT_WRITE + "\nimport sys\nfrom labelgen.cli import app\nsys.argv = ['labelgen', *sys.argv[1:]]\napp()"
    r = subprocess.run([sys.executable, "-c", code, "generate", "--teacher", tiny_teacher, "--input",
                        str(corpus / "docs.jsonl"), "--out", str(tmp_path / "l"), "--k", "16", "--max-seq-len", "64",
                        "--rows-per-shard", "6", "--no-progress", "--device", "cpu"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "labelgen")
    assert re.search(r"shard-\d+\.parquet\.tmp: No space left on device$", line), line
    assert not (tmp_path / "l" / "manifest.json").exists() and not list((tmp_path / "l").glob("*.tmp"))


FULL_DISK_AT_CHECKPOINT = """
import collections, shutil, torch
from student_train import checkpoint
_save, calls = torch.save, [0]
def save(obj, f, *a, **kw):
    calls[0] += 1
    if calls[0] > 2:   # the second checkpoint's optimizer state: torch's zip writer on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3008 vs 2900")
    return _save(obj, f, *a, **kw)
checkpoint.torch.save = save
shutil.disk_usage = lambda path: collections.namedtuple("u", "total used free")(1 << 30, 1 << 30, 0)
"""


def test_a_full_disk_at_a_checkpoint_is_one_line_leaves_no_half_checkpoint_and_resume_works(topk_labels,
                                                                                          student_config, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--labels", str(topk_labels), "--student-config", student_config, "--out", str(out),
            "--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--warmup-steps", "1", "--no-progress",
            "--device", "cpu"]
    code = FULL_DISK_AT_CHECKPOINT + "\nimport sys\nfrom student_train.cli import app\nsys.argv = ['student-train', *sys.argv[1:]]\napp()"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr, "student-train")
    assert "step_000004: cannot write the checkpoint (no space left on device)" in line, line
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step_000002"]   # no half checkpoint
    r = subprocess.run([sys.executable, "-m", "student_train.cli", *args, "--resume"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "step_000004" / "meta.json").is_file()


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


def test_rounds_takes_the_skip_bad_its_errors_suggest(tmp_path):
    from student_train.cli import app
    r = runner.invoke(app, ["rounds", "--teacher", "t", "--student", "s", "--prompts", "p.jsonl", "--out",
                            str(tmp_path / "r"), "--skip-bad", "--dry-run"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skip_bad"] is True, r.output
    from student_train.config import RoundsConfig
    from student_train.rounds import EXECUTION_ONLY
    assert "skip_bad" in EXECUTION_ONLY and RoundsConfig(teacher="t", student="s", prompts=("p",), out="o").skip_bad is False


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


BOMB_BYTES = 96 << 20   # above the 64 MiB a row group may always hold: refused by its expansion


@pytest.fixture(scope="module")
def every_kind(tiny_teacher, corpus, tmp_path_factory):
    """A small label set of every record kind, made by `labelgen generate`."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    d = tmp_path_factory.mktemp("kinds")
    docs, prompts = (str(corpus / "docs.jsonl"),), (str(corpus / "prompts.jsonl"),)
    common = dict(teacher=tiny_teacher, max_seq_len=64, rows_per_shard=4, progress=False, device="cpu")
    for name, kw in [("topk", dict(inputs=docs, mode="topk", k=4)), ("sampled", dict(inputs=docs, mode="sampled", draws=4)),
                     ("tokens", dict(inputs=docs, mode="tokens")),
                     ("samples", dict(inputs=prompts, mode="sample", prompt_field="prompt", n=1, max_new_tokens=4)),
                     ("scored", dict(inputs=(str(d / "samples"),), mode="score", k=4))]:
        run(GenerateConfig(out=str(d / name), **common, **kw))
    return d


def bombs(src, dst):
    """Copies of label set `src`, each with one column of its first shard made
    a bomb (one row holding ~96 MiB of one repeated value, a few KB on disk),
    plus one whose row group declares more rows than the format's writers make;
    each with a consistent manifest. Yields (name, directory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(src / "shard-000000.parquet")
    for i, field in enumerate(table.schema):
        t = field.type
        value_type = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else None
        if value_type is not None and (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
            bomb = pa.array([[0] * (BOMB_BYTES // value_type.byte_width)], type=t)
        elif pa.types.is_string(t) or pa.types.is_binary(t):
            bomb = pa.array(["a" * BOMB_BYTES], type=t)
        else:
            continue   # fixed width per row: bounded by the row count
        column = pa.concat_arrays([bomb, table.column(i).combine_chunks()[1:]])
        yield field.name, _rewritten(src, dst / field.name, table.set_column(i, field, column), table.num_rows)
    many = pa.concat_tables([table] * (70_000 // table.num_rows + 1))
    yield "rows", _rewritten(src, dst / "rows", many, many.num_rows)


def _rewritten(src, d, table, row_group_size):
    import pyarrow.parquet as pq
    from labelgen.store import storage
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.lock"))
    shard = d / "shard-000000.parquet"
    footer = {k: v for k, v in (pq.ParquetFile(shard).metadata.metadata or {}).items() if k != b"ARROW:schema"}
    with pq.ParquetWriter(shard, table.schema, compression="zstd") as w:   # the id table and every footer key kept
        w.write_table(table, row_group_size=row_group_size)
        w.add_key_value_metadata(footer)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0].update(rows=table.num_rows, bytes=shard.stat().st_size, sha256=storage.sha256_file(shard),
                          footer_sha256=storage.footer_sha256(shard), row_groups=1)
    m["counts"]["rows"] = sum(s["rows"] for s in m["shards"])
    m["fingerprint"] = fmt.dataset_fingerprint(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


PROBE = """
import json, sys
from labelgen.format import FormatError
from labelgen.tools.inspection import inspect, validate
from student_train.data import LabelStream, open_label_sets
seen = {}
for d in sys.argv[1:]:
    said = []
    said += [p["problem"] for p in validate(d)["problems"]]
    for step in (lambda: inspect(d), lambda: [b for b in LabelStream(open_label_sets([d]), 4).rows(0)]):
        try:
            step()
            said.append("read")
        except FormatError as e:
            said.append(str(e))
    seen[d] = said
# VmHWM: this process's own peak (ru_maxrss would carry the forking test's over exec)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seen": seen, "peak_mb": peak / 1024}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk", "sampled", "tokens", "samples", "scored"])
def test_bombs_in_every_column_and_huge_row_counts_are_refused_in_bounded_memory(every_kind, tmp_path, kind):
    made = dict(bombs(every_kind / kind, tmp_path))
    assert len(made) >= 3 and "rows" in made
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, made.values())], capture_output=True, text=True,
                       timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name, d in made.items():
        said = out["seen"][str(d)]
        why = "declares 7" if name == "rows" else "refused as a decompression bomb"
        assert len(said) == 3 and all(why in s and "\n" not in s for s in said), (name, said)
    assert out["peak_mb"] < 1024, out["peak_mb"]   # validate, inspect and the training loader: under 1 GiB
