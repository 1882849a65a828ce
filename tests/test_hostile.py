"""Label sets from elsewhere are hostile: damaged bytes, lying manifests and
paths that lead out of the label directory must end in one clear error,
never in wrong rows, a traceback or an unbounded allocation."""

import json
import shutil

import numpy as np
import pytest

from helpers import topk_row
from typer.testing import CliRunner

from labelgen import format as fmt
from labelgen.cli import app
from labelgen.format import Encoding, FormatError
from labelgen.shards import ShardReader, ShardWriter
from labelgen.store import storage
from labelgen.tools.inspection import inspect, validate

K, V = 8, 700
runner = CliRunner()


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    rng = np.random.default_rng(3)
    d = tmp_path_factory.mktemp("clean") / "l"
    rows = [topk_row(rng, f"e{i}", int(rng.integers(5, 30)), V, K) for i in range(24)]
    with ShardWriter(d, "topk", K, V, encoding=Encoding(row_group_rows=4), max_rows=10,
                     header={"config": {"max_seq_len": 32}}) as w:
        for r in rows:
            w.write(r)
    return d


@pytest.fixture(scope="module")
def truncated_set(tmp_path_factory):
    """Adaptively truncated labels (variable_k): 1..K entries per position."""
    rng = np.random.default_rng(4)
    d = tmp_path_factory.mktemp("truncated") / "l"
    rows = [topk_row(rng, f"e{i}", int(rng.integers(5, 30)), V, K) for i in range(24)]
    for r in rows:
        r["topk_logprobs"][np.arange(K) >= rng.integers(1, K + 1, (len(r["coverage"]), 1))] = -np.inf
        r["coverage"] = np.exp(r["topk_logprobs"].astype(np.float64)).sum(1).astype(np.float32)
    with ShardWriter(d, "topk", K, V, encoding=Encoding(row_group_rows=4, variable_k=True), max_rows=10,
                     header={"config": {"max_seq_len": 32}}) as w:
        for r in rows:
            w.write(r)
    return d


def read_all(d):
    return [{k: v for k, v in r.items()} for r in ShardReader(d).rows()]


def same_rows(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) if isinstance(x[k], np.ndarray) else x[k] == y[k]
                                     for k in x) for x, y in zip(a, b))


def one_line_format_error(fn):
    """Run fn; return 'ok' and its result, or 'error' when it raised a one-line FormatError."""
    try:
        return "ok", fn()
    except FormatError as e:
        assert "\n" not in str(e), str(e)
        return "error", None


@pytest.mark.parametrize("label_set, cases", [("clean_set", 240), ("truncated_set", 80)])
def test_damaged_shards_fail_with_one_line_or_read_correctly(request, tmp_path, label_set, cases):
    """Random flipped bytes and truncations (240 cases, and 80 on adaptively
    truncated labels): every read either returns exactly the original rows or
    raises one FormatError line; validate flags every damaged file; nothing
    else escapes."""
    clean_set = request.getfixturevalue(label_set)
    original = read_all(clean_set)
    assert validate(clean_set)["ok"]
    rng = np.random.default_rng(0)
    shards = sorted(p.name for p in clean_set.glob("*.parquet"))
    outcomes = {"ok": 0, "error": 0}
    for case in range(cases):
        d = tmp_path / f"c{case}"
        shutil.copytree(clean_set, d)
        victim = d / shards[case % len(shards)]
        data = bytearray(victim.read_bytes())
        if case % 3 == 0:
            victim.write_bytes(data[: int(rng.integers(0, len(data)))])
        else:
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= int(rng.integers(1, 256))
            victim.write_bytes(bytes(data))
        status, rows = one_line_format_error(lambda: read_all(d))
        if status == "ok":
            assert same_rows(rows, original), f"case {case}: wrong rows read without an error"
        outcomes[status] += 1
        report = validate(d)
        assert not report["ok"], f"case {case}: validate passed a damaged shard"
        assert all("\n" not in p["problem"] for p in report["problems"])
        one_line_format_error(lambda: inspect(d))
        if case % 8 == 0:   # the commands themselves: an exit code and a line, never a traceback
            for command, codes in ((["validate", str(d)], (1,)), (["inspect", str(d)], (0, 2))):
                r = runner.invoke(app, command)
                assert r.exit_code in codes and "Traceback" not in r.output, (case, command, r.output[-2000:])
                assert r.exception is None or isinstance(r.exception, SystemExit), (case, command, r.exception)
        shutil.rmtree(d)
    assert outcomes["error"] > cases * 0.4


def rewrite_manifest(d, change):
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.parquet", "sub/shard.parquet", "..", ".hidden.parquet",
                                  "shard-000000.parquet\\x", 7])
def test_shard_names_must_be_plain_files_inside_the_label_directory(clean_set, tmp_path, name):
    d = tmp_path / "l"
    shutil.copytree(clean_set, d)
    rewrite_manifest(d, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(FormatError, match=r"shards\[0\]: shard name .* is not a plain file name"):
        ShardReader(d)
    assert not validate(d)["ok"]


def test_a_symlinked_shard_leading_out_of_the_directory_is_refused(clean_set, tmp_path):
    d = tmp_path / "l"
    shutil.copytree(clean_set, d)
    outside = tmp_path / "elsewhere.parquet"
    first = d / "shard-000000.parquet"
    shutil.move(first, outside)
    first.symlink_to(outside)
    with pytest.raises(FormatError, match="a symlink out of the label directory"):
        read_all(d)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(k=10**9), r"k 1000000000 outside"),
    (lambda m: m.update(vocab_size=2**40), r"vocab_size .* outside"),
    (lambda m: m["config"].update(max_seq_len=10**12), r"max_seq_len .* outside"),
    (lambda m: m["shards"][0].update(rows=-1), r"rows -1 is not a non-negative integer"),
])
def test_a_manifest_claiming_impossible_sizes_is_refused_before_any_allocation(clean_set, tmp_path, change, message):
    d = tmp_path / "l"
    shutil.copytree(clean_set, d)
    rewrite_manifest(d, change)
    with pytest.raises(FormatError, match=message):
        ShardReader(d)


def test_a_row_group_longer_than_max_seq_len_allows_is_refused_before_decoding(tmp_path, rng):
    d = tmp_path / "l"
    with ShardWriter(d, "topk", K, V, header={"config": {"max_seq_len": 200}}) as w:
        w.write(topk_row(rng, "long", 150, V, K))
    rewrite_manifest(d, lambda m: m["config"].update(max_seq_len=16))
    with pytest.raises(FormatError, match=r"150 input ids in 1 rows, more than max_seq_len 16 allows"):
        read_all(d)


def test_a_damaged_id_table_is_caught_by_the_footer_hash(clean_set, tmp_path):
    d = tmp_path / "l"
    shutil.copytree(clean_set, d)
    shard = d / "shard-000000.parquet"
    data = bytearray(shard.read_bytes())
    at = data.find(fmt.ID_TABLE_FOOTER_KEY) + len(fmt.ID_TABLE_FOOTER_KEY) + 8   # inside the table's base64
    data[at] = ord("A") if data[at] != ord("A") else ord("B")   # still valid base64: another id order
    shard.write_bytes(bytes(data))
    rewrite_manifest(d, lambda m: m["shards"][0].update(sha256=storage.sha256_file(shard)))   # a consistent forgery
    with pytest.raises(FormatError, match="footer does not match the manifest's hash"):
        read_all(d)
