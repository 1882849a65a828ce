"""Label sets of many shards: the manifest lists them in a Parquet shard
table beside it (format 2.3), readers hold it column-wise, the loader plans
with arrays and a keyed permutation, and start-up asks the store for a
constant number of objects. SHARD_TABLE_MIN is lowered so small sets take
the path a million-shard set takes."""

import json
import re
import shutil

import numpy as np
import pytest

from labelgen import format as fmt
from labelgen.format import manifest as manifest_module
from labelgen.generate import GenerateConfig, run as generate
from labelgen.generate.finalize import finalize
from labelgen.shards import ShardReader
from labelgen.tools.inspection import validate
from student_train.data import LabelStream, UnitPlan, holdout_split, open_label_sets

from helpers import BUCKET


@pytest.fixture
def table_min(monkeypatch):
    monkeypatch.setattr(manifest_module, "SHARD_TABLE_MIN", 3)


def gen(teacher, corpus, out, workers=1, **kw):
    for w in range(workers):
        generate(GenerateConfig(teacher=teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(out), k=8, max_seq_len=32,
                                rows_per_shard=2, progress=False, device="cpu", num_workers=workers, worker_index=w,
                                encoding={"row_group_rows": 2}, **kw))
    if workers > 1:
        finalize(str(out))


def rows(where):
    return [{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
            for r in ShardReader(where).rows()]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_set_of_more_shards_than_the_inline_limit_keeps_them_in_a_table_and_reads_the_same(
        workers, table_min, tiny_teacher, corpus, tmp_path):
    gen(tiny_teacher, corpus, tmp_path / "table", workers)
    manifest = json.loads((tmp_path / "table" / "manifest.json").read_text())
    assert "shards" not in manifest and manifest["format_version"] == max(fmt.SHARD_TABLE_VERSION, fmt.FORMAT_VERSION)
    table = manifest["shard_table"]
    assert table["count"] == 12 and (tmp_path / "table" / table["name"]).is_file()
    reader = ShardReader(tmp_path / "table")
    assert len(reader.shards) == 12 and reader.shards[11]["name"] == "shard-000011.parquet"
    assert validate(str(tmp_path / "table"))["ok"]
    manifest_module.SHARD_TABLE_MIN = 10_000   # the same run with its list inline
    gen(tiny_teacher, corpus, tmp_path / "inline", workers)
    assert "shards" in json.loads((tmp_path / "inline" / "manifest.json").read_text())
    assert rows(tmp_path / "table") == rows(tmp_path / "inline")
    assert [dict(s) for s in reader.shards] == [dict(s) for s in ShardReader(tmp_path / "inline").shards]
    # the table is part of the set's identity, and corrupting it is found
    path = tmp_path / "table" / table["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match="shard table"):
        ShardReader(tmp_path / "table")


def test_a_shard_table_that_names_a_path_outside_or_disagrees_with_the_manifest_is_refused(table_min, tiny_teacher,
                                                                                          corpus, tmp_path):
    gen(tiny_teacher, corpus, tmp_path / "l")
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    for forged, words in ((dict(name="../" + m["shard_table"]["name"]), "must name a manifest.shards-"),
                          (dict(count=11), "12 entries, or columns other than a shard table's; the manifest says 11")):
        (tmp_path / "l" / "manifest.json").write_text(json.dumps({**m, "shard_table": {**m["shard_table"], **forged}}))
        with pytest.raises(fmt.FormatError, match=words.replace("(", r"\(").replace(")", r"\)")):
            ShardReader(tmp_path / "l")


def test_old_manifests_without_row_group_counts_or_footer_hashes_still_open_and_train_the_same(topk_labels,
                                                                                               student_config,
                                                                                               tmp_path):
    """A format 2.0 set (its entries lack row_groups and footer_sha256) trains
    to the losses of the same shards listed as today's writer lists them."""
    from student_train.config import TrainConfig
    from student_train.train import train
    old = tmp_path / "old"
    shutil.copytree(topk_labels, old, ignore=shutil.ignore_patterns("*.lock"))
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = "2.0"
    m["shards"] = [{k: v for k, v in s.items() if k not in ("row_groups", "footer_sha256")} for s in m["shards"]]
    m["fingerprint"] = fmt.dataset_fingerprint(m)
    (old / "manifest.json").write_text(json.dumps(m))
    losses = []
    for labels in (topk_labels, old):
        train(TrainConfig(labels=(str(labels),), out=str(tmp_path / f"run-{labels.name}"), student_config=student_config,
                          max_steps=3, batch_size=2, log_every=1, eval_every=0, save_every=0, progress=False,
                          device="cpu"))
        losses.append([json.loads(line)["loss"] for line in (tmp_path / f"run-{labels.name}" / "metrics.jsonl").open()])
    assert losses[0] == losses[1]


def test_the_loader_plan_deals_every_row_group_once_to_disjoint_consumers(topk_labels):
    readers = open_label_sets([str(topk_labels)])
    stream = LabelStream(readers, 2, seed=3)
    everything = sorted(stream.consumer_units(0, 0, 1))
    assert everything == sorted((0, s, g) for s in range(len(readers[0].shards))
                                for g in range(readers[0].shards[s]["row_groups"]))
    dealt = [u for slot in range(3) for u in stream.consumer_units(0, slot, 3)]
    assert sorted(dealt) == everything
    assert stream.consumer_units(0, 0, 1) != stream.consumer_units(1, 0, 1)   # each epoch its own order
    assert stream.consumer_units(0, 1, 3, first=1, count=2) == stream.consumer_units(0, 1, 3)[1:3]
    assert LabelStream(readers, 2, shuffle=False).consumer_units(0, 0, 1) == everything


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 4099])
def test_the_keyed_permutation_is_a_bijection_and_each_epoch_differs(size):
    plan = UnitPlan([], [])
    plan.size, plan.half = size, max(1, (max(size - 1, 1).bit_length() + 1) // 2)
    orders = [plan.order(np.arange(size), 5, epoch, True) for epoch in (0, 1)]
    assert all(sorted(o.tolist()) == list(range(size)) for o in orders)
    assert size < 7 or not np.array_equal(*orders)


def test_holdout_takes_the_last_shards_of_the_sets_in_order(topk_labels):
    readers = open_label_sets([str(topk_labels), str(topk_labels)])
    n = len(readers[0].shards)
    assert holdout_split(readers, 0) == ([(0, 0, n), (1, 0, n)], [])
    assert holdout_split(readers, n + 1) == ([(0, 0, n - 1)], [(0, n - 1, n), (1, 0, n)])


def test_start_up_asks_a_bucket_for_a_few_objects_whatever_the_shard_count(s3, table_min, tiny_teacher, corpus,
                                                                           tmp_path):
    """Opening a set of a shard table and planning the loader: the manifest and
    the table, no request per shard (counted at the S3 API)."""
    uri = f"s3://{BUCKET}/many"
    gen(tiny_teacher, corpus, uri)
    s3["requests"].clear()
    readers = open_label_sets([uri])
    LabelStream(readers, 2, rank=3, world_size=4)
    assert len(readers[0].shards) == 12
    assert 1 <= len(s3["requests"]) <= 10, s3["requests"]


def forge_table(label_dir, edit) -> dict:
    """Rewrite a set's shard table with `edit(entries) -> entries` applied, and its manifest to match (count,
    size, hashes, fingerprint), as a careful forger would: what is refused is the entries, not a broken hash."""
    import hashlib
    import pyarrow as pa
    import pyarrow.parquet as pq
    m = json.loads((label_dir / "manifest.json").read_text())
    old = label_dir / m["shard_table"]["name"]
    entries = edit(pq.read_table(old).to_pylist())
    (label_dir / m["shard_table"]["name"]).unlink()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(entries, schema=manifest_module._schema()), sink)
    data = sink.getvalue().to_pybytes()
    digest = hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[-8:-4], "little")
    m["shard_table"] = {"name": f"{fmt.SHARD_TABLE_PREFIX}{digest[:16]}{fmt.SHARD_SUFFIX}", "count": len(entries),
                        "bytes": len(data), "sha256": digest, "footer_sha256": hashlib.sha256(data[-8 - n:]).hexdigest()}
    (label_dir / m["shard_table"]["name"]).write_bytes(data)
    m["fingerprint"] = fmt.dataset_fingerprint(m)
    (label_dir / "manifest.json").write_text(json.dumps(m))
    return m


def cli_error(program: str, *args: str) -> tuple[int, str]:
    import subprocess
    import sys
    from helpers import one_line_error
    module = {"labelgen": "labelgen.cli", "student-train": "student_train.cli"}[program]
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    return r.returncode, one_line_error(r.stderr, program)


@pytest.mark.parametrize("edit, words", [
    (lambda e: [{**e[0], "row_groups": 0}] + e[1:], "rows in 0 row groups, which no writer makes"),
    (lambda e: [{**e[0], "row_groups": 10**9}] + e[1:], "rows in 1000000000 row groups"),
    (lambda e: [e[0], e[0]] + e[2:], "shard shard-000000.parquet is listed more than once"),
    (lambda e: [], "the shard table lists 0 shards; a label set has at least one"),
], ids=["no_row_groups", "huge_row_groups", "duplicated", "empty"])
def test_a_forged_shard_table_is_refused_in_one_line_by_validate_inspect_and_train(edit, words, table_min, tiny_teacher,
                                                                                  corpus, student_config, tmp_path):
    gen(tiny_teacher, corpus, tmp_path / "l")
    forge_table(tmp_path / "l", edit)
    with pytest.raises(fmt.FormatError, match=re.escape(words)):
        ShardReader(tmp_path / "l")
    v = validate(str(tmp_path / "l"))
    assert not v["ok"] and words in v["problems"][0]["problem"]
    for program, args in (("labelgen", ("inspect", str(tmp_path / "l"))),
                          ("student-train", ("train", "--labels", str(tmp_path / "l"), "--student-config", student_config,
                                             "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"))):
        rc, line = cli_error(program, *args)
        assert rc != 0 and words in line, (program, line)


def test_validate_compares_every_table_entry_with_its_file_from_the_footer(table_min, tiny_teacher, corpus, tmp_path):
    """Entries that fit each other but not their files: a wrong positions count, a plausible wrong row-group count
    (the loader would plan a group the file lacks)."""
    gen(tiny_teacher, corpus, tmp_path / "l")   # shard 1: 4 windows in 2 row groups of 2
    assert validate(str(tmp_path / "l"))["ok"]
    m = forge_table(tmp_path / "l", lambda e: [{**e[0], "positions": e[0]["positions"] + 1},
                                               {**e[1], "row_groups": 1}] + e[2:])
    assert ShardReader(tmp_path / "l").shards[1]["rows"] == 4 and m["shard_table"]["count"] == 12
    problems = {p["file"].rsplit("/", 1)[-1]: p["problem"] for p in validate(str(tmp_path / "l"))["problems"]}
    assert problems["shard-000000.parquet"].startswith("the manifest says ") and "positions, the file holds" in \
        problems["shard-000000.parquet"]
    assert problems.get("shard-000001.parquet") == "the manifest says 1 row groups, the file has 2", problems


@pytest.mark.parametrize("damage, words", [
    ("missing", "the shard table the manifest names is missing"),
    ("symlink", "a symlink out of the label directory; the shard table must lie inside it"),
    ("bytes", "bytes, the manifest says"),
])
def test_a_missing_moved_or_resized_shard_table_is_one_line_and_validate_exits_1(damage, words, table_min, tiny_teacher,
                                                                                corpus, tmp_path):
    gen(tiny_teacher, corpus, tmp_path / "l")
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    table = tmp_path / "l" / m["shard_table"]["name"]
    if damage == "missing":
        table.unlink()
    elif damage == "symlink":
        outside = tmp_path / "elsewhere.parquet"
        shutil.move(table, outside)
        table.symlink_to(outside)
    else:
        m["shard_table"]["bytes"] += 1
        (tmp_path / "l" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(fmt.FormatError, match=re.escape(words)):
        ShardReader(tmp_path / "l")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "labelgen.cli", "validate", str(tmp_path / "l")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
