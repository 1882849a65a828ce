import base64
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import assert_stored_coverage, assert_stored_target_logprob, topk_row
from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.format import Encoding, FormatError
from labelgen.shards import ShardReader, ShardWriter
from labelgen.store import storage


def write_set(path, rows, k, vocab, **kw):
    with ShardWriter(path, "topk", k, vocab, **kw) as w:
        for r in rows:
            w.write(r)
    return w.manifest


def assert_same_entries(ids_a, lp_a, ids_b, lp_b, enc, slack=1e-6):
    """Same (id, logprob) pairs per position, exact logprobs `lp_a` decoded
    as `lp_b` within the encoding's error bound; order may differ only
    between entries whose decoded logprobs tie."""
    oa, ob = np.argsort(ids_a, 1), np.argsort(ids_b, 1)
    np.testing.assert_array_equal(np.take_along_axis(ids_a, oa, 1), np.take_along_axis(ids_b, ob, 1))
    err = enc.error(np.take_along_axis(lp_a, oa, 1), np.take_along_axis(lp_b, ob, 1))
    assert err.max() <= enc.max_error + slack
    assert (np.diff(lp_b, axis=1) <= 0).all()


@pytest.mark.parametrize("order, codec", [("sorted", "sqrt"), ("sorted", "u8"), ("sorted", "f32"), ("rank", "sqrt"),
                                          ("rank", "gap"), ("rank", "u8"), ("rank", "f32")])
def test_topk_round_trip_within_documented_error(tmp_path, rng, order, codec):
    k, V = 8, 500
    rows = [topk_row(rng, f"ex{i}", int(rng.integers(2, 40)), V, k) for i in range(30)]
    enc = Encoding(id_order=order, logprob_codec=codec, row_group_rows=7)
    write_set(tmp_path / "l", rows, k, V, encoding=enc, max_rows=11)
    out = list(ShardReader(tmp_path / "l", verify=True).rows())
    assert [r["example_id"] for r in out] == [r["example_id"] for r in rows]
    for a, b in zip(rows, out):
        assert b["topk_ids"].dtype == np.int64 and b["topk_logprobs"].dtype == np.float32
        assert_same_entries(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], enc)
        if order == "rank" or codec == "f32":   # no quantisation ties: the exact rank order survives
            np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert_position_columns_within_documented_error(a, b, enc)
        np.testing.assert_array_equal(a["target_rank"], b["target_rank"])


def assert_position_columns_within_documented_error(a, b, enc):
    """coverage within 1/510 in sqrt(tail mass), target_logprob within 1/128 nat (2.0); exact under f32."""
    assert b["coverage"].dtype == np.float32 and b["target_logprob"].dtype == np.float32
    if enc.position_codec == "f32":
        np.testing.assert_array_equal(a["coverage"], b["coverage"])
        np.testing.assert_array_equal(a["target_logprob"], b["target_logprob"])
        return
    assert_stored_coverage(b["coverage"], a["coverage"])
    assert_stored_target_logprob(b["target_logprob"], a["target_logprob"])


@pytest.mark.parametrize("position_codec", ["quantized", "f32"])
def test_per_position_columns_round_trip_within_their_bound(tmp_path, rng, position_codec):
    k, V = 4, 300
    rows = [topk_row(rng, f"ex{i}", 20, V, k) for i in range(6)]
    rows[0]["coverage"][:4] = [1.0, 0.0, 1 - 1e-7, 0.5]            # the ends of the range
    rows[0]["target_logprob"][:3] = [0.0, fmt.LOGPROB_FLOOR, -1e-6]
    enc = Encoding(position_codec=position_codec)
    write_set(tmp_path / "l", rows, k, V, encoding=enc)
    for a, b in zip(rows, ShardReader(tmp_path / "l").rows()):
        assert_position_columns_within_documented_error(a, b, enc)
    out = next(ShardReader(tmp_path / "l").rows())
    assert out["target_logprob"][1] == fmt.LOGPROB_FLOOR and out["target_logprob"][0] == 0


def test_a_position_column_stored_in_another_type_than_the_encoding_says_is_refused(tmp_path, rng):
    rows = [topk_row(rng, "e0", 9, 200, 4)]
    write_set(tmp_path / "l", rows, 4, 200, encoding=Encoding(position_codec="f32"))
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    m["encoding"]["position_codec"] = "quantized"
    (tmp_path / "l" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="coverage holds float32 values; the encoding stores uint8"):
        list(ShardReader(tmp_path / "l").rows())


@pytest.mark.parametrize("order, codec, id_map", [("sorted", "sqrt", "frequency"), ("sorted", "u8", "none"),
                                                  ("rank", "sqrt", "frequency"), ("rank", "f32", "none")])
def test_adaptively_truncated_rows_keep_just_their_entries(tmp_path, rng, order, codec, id_map):
    """variable_k: entries marked -inf are not stored (the shard is smaller);
    the rest come back as before, dropped slots as id 0 / -inf after them."""
    k, V = 8, 500
    rows = [topk_row(rng, f"ex{i}", int(rng.integers(2, 40)), V, k) for i in range(30)]
    for r in rows:
        kept = rng.integers(1, k + 1, len(r["coverage"]))
        r["topk_logprobs"][np.arange(k) >= kept[:, None]] = -np.inf
        r["coverage"] = np.exp(r["topk_logprobs"].astype(np.float64)).sum(1).astype(np.float32)   # the kept mass
    enc = Encoding(id_order=order, logprob_codec=codec, id_map=id_map, variable_k=True, row_group_rows=7)
    m = write_set(tmp_path / "l", rows, k, V, encoding=enc, max_rows=11)
    stored = 0
    for shard in m["shards"]:
        md = pq.ParquetFile(tmp_path / "l" / shard["name"]).metadata
        cols = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]
        stored += sum(md.row_group(g).column(cols.index(fmt.TOPK_IDS)).num_values for g in range(md.num_row_groups))
    assert stored == sum(np.isfinite(r["topk_logprobs"]).sum() for r in rows)
    out = list(ShardReader(tmp_path / "l", verify=True).rows())
    for a, b in zip(rows, out):
        kept = np.isfinite(a["topk_logprobs"])
        np.testing.assert_array_equal(np.isfinite(b["topk_logprobs"]), kept)
        np.testing.assert_array_equal(b["topk_lengths"], kept.sum(1))
        assert (b["topk_ids"][~kept] == 0).all()
        for p in range(len(kept)):
            n = kept[p].sum()
            assert_same_entries(a["topk_ids"][p:p + 1, :n], a["topk_logprobs"][p:p + 1, :n],
                                b["topk_ids"][p:p + 1, :n], b["topk_logprobs"][p:p + 1, :n], enc)
        assert_position_columns_within_documented_error(a, b, enc)
    from labelgen.tools.inspection import inspect, validate
    assert validate(tmp_path / "l")["problems"] == []
    r = inspect(tmp_path / "l")
    assert r["entries_per_position"] == pytest.approx(stored / r["positions"])


def test_adaptive_truncation_needs_the_top_entry_and_refuses_the_gap_codec(tmp_path, rng):
    row = topk_row(rng, "ex", 5, 500, 8)
    row["topk_logprobs"][2, :] = -np.inf
    with pytest.raises(FormatError, match="position 2 keeps no entry"):
        write_set(tmp_path / "l", [row], 8, 500, encoding=Encoding(variable_k=True))
    with pytest.raises(FormatError, match="gap"):
        Encoding(id_order="rank", logprob_codec="gap", variable_k=True)


def test_ids_use_the_narrowest_width_the_vocabulary_allows():
    assert fmt.id_dtype(256) == np.uint8
    assert fmt.id_dtype(257) == np.uint16
    assert fmt.id_dtype(65536) == np.uint16
    assert fmt.id_dtype(65537) == np.uint32
    assert fmt.id_dtype(152064) == np.uint32


def test_large_vocabulary_ids_survive_the_round_trip(tmp_path, rng):
    V, k = 152064, 4
    row = topk_row(rng, "big", 6, 1000, k)
    row["topk_ids"] = row["topk_ids"] + (V - 1000)
    write_set(tmp_path / "l", [row], k, V)
    (out,) = ShardReader(tmp_path / "l").rows()
    assert_same_entries(row["topk_ids"], row["topk_logprobs"], out["topk_ids"], out["topk_logprobs"], Encoding())
    assert out["topk_ids"].max() == row["topk_ids"].max() > 131072


def test_the_gap_codec_needs_rank_order():
    with pytest.raises(FormatError, match="gap' needs id_order 'rank'"):
        Encoding(id_order="sorted", logprob_codec="gap")


def test_reader_projects_columns_and_holds_one_row_group(tmp_path, rng):
    rows = [topk_row(rng, f"e{i}", 10, 300, 4) for i in range(20)]
    write_set(tmp_path / "l", rows, 4, 300, encoding=Encoding(row_group_rows=5))
    reader = ShardReader(tmp_path / "l")
    batches = list(reader.batches(columns=["example_id", "coverage"]))
    assert len(batches) == 4
    assert set(batches[0]) == {"example_id", "coverage"}
    assert len(batches[0]["example_id"]) == 5
    rows_t = list(reader.rows(columns=["topk_ids"], as_torch=True))
    assert set(rows_t[0]) == {"topk_ids"}
    assert rows_t[0]["topk_ids"].shape == (9, 4) and str(rows_t[0]["topk_ids"].dtype) == "torch.int64"
    full = next(iter(reader.rows()))
    np.testing.assert_array_equal(rows_t[0]["topk_ids"].numpy(), full["topk_ids"])


def test_reader_refuses_an_unknown_major_version(tmp_path, rng):
    write_set(tmp_path / "l", [topk_row(rng, "a", 5, 100, 2)], 2, 100)
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    m["format_version"] = "3.0"
    (tmp_path / "l" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"format version 3.0 is not supported; this labelgen reads 1.x, 2.x"):
        ShardReader(tmp_path / "l")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(topk_ids=r["topk_ids"][:, :3]), "must both be"),
    (lambda r: r.update(topk_logprobs=r["topk_logprobs"][:, ::-1].copy()), "not sorted descending"),
    (lambda r: r.update(topk_logprobs=r["topk_logprobs"] + 5), "positive logprob"),
    (lambda r: r["topk_ids"].__setitem__((0, 0), 100), r"outside \[0, 100\)"),
    (lambda r: r["topk_logprobs"].__setitem__((1, 1), np.nan), "NaN"),
    (lambda r: r.update(coverage=r["coverage"][:-1]), "expected 4"),
    (lambda r: r.update(coverage=r["coverage"] + 2), r"coverage outside \[0, 1\]"),
])
def test_writer_rejects_a_bad_row_naming_the_example(tmp_path, rng, mutate, message):
    row = topk_row(rng, "doc-7", 5, 100, 4)
    mutate(row)
    with pytest.raises(FormatError, match=rf"example 'doc-7': .*{message}"):
        write_set(tmp_path / "l", [row], 4, 100)
    assert not (tmp_path / "l" / "manifest.json").exists()
    assert not list((tmp_path / "l").glob("*.parquet"))


def test_writer_refuses_a_non_empty_directory_unless_told(tmp_path, rng):
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "keep.txt").write_text("x")
    with pytest.raises(FormatError, match="not empty"):
        ShardWriter(tmp_path / "l", "topk", 2, 100)
    write_set(tmp_path / "l", [topk_row(rng, "a", 5, 100, 2)], 2, 100, exist="overwrite")
    assert not (tmp_path / "l" / "keep.txt").exists()


def test_validate_accepts_a_good_set_and_detects_sha256_mismatch(tmp_path, rng):
    from labelgen.tools.inspection import validate
    write_set(tmp_path / "l", [topk_row(rng, f"e{i}", 30, 300, 8) for i in range(10)], 8, 300)
    assert validate(tmp_path / "l")["ok"]
    shard = tmp_path / "l" / "shard-000000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = validate(tmp_path / "l")
    assert not r["ok"] and "sha256" in r["problems"][0]["problem"]
    assert r["problems"][0]["file"].endswith("shard-000000.parquet")


def test_truncated_shard_is_named_by_reader_and_validate(tmp_path, rng):
    from labelgen.tools.inspection import validate
    write_set(tmp_path / "l", [topk_row(rng, f"e{i}", 30, 300, 8) for i in range(10)], 8, 300)
    shard = tmp_path / "l" / "shard-000000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"shard-000000.parquet: .* bytes, manifest says .* \(truncated"):
        list(ShardReader(tmp_path / "l").rows())
    assert "truncated" in validate(tmp_path / "l")["problems"][0]["problem"]


def test_validate_finds_logical_faults_by_file_and_row(tmp_path, rng):
    from labelgen.tools.inspection import validate
    rows = [topk_row(rng, f"e{i}", 12, 300, 8) for i in range(6)]
    rows[4]["coverage"] = rows[4]["coverage"] * 0.5  # inconsistent with its logprobs
    write_set(tmp_path / "l", rows, 8, 300)
    (p,) = validate(tmp_path / "l")["problems"]
    assert p["row"] == 4 and "coverage differs" in p["problem"]


def test_validate_bounds_the_coverage_error_by_the_entries_a_position_keeps(tmp_path, rng):
    """variable_k: one kept entry of p = 0.3 cannot add up to coverage 0.312
    (the codec's bound for one entry is ~0.008; for all k = 8 it would be ~0.016)."""
    from labelgen.tools.inspection import validate
    rows = [topk_row(rng, f"e{i}", 12, 300, 8) for i in range(3)]
    rows[1]["topk_logprobs"][5] = [np.log(0.3)] + [-np.inf] * 7
    rows[1]["coverage"][5] = 0.312
    write_set(tmp_path / "l", rows, 8, 300, encoding=Encoding(variable_k=True))
    (p,) = validate(tmp_path / "l")["problems"]
    assert p["row"] == 1 and "coverage differs" in p["problem"]


def test_foreign_and_extra_files_are_reported(tmp_path, rng):
    from labelgen.tools.inspection import validate
    write_set(tmp_path / "l", [topk_row(rng, "a", 5, 100, 2)], 2, 100)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "l" / "stray.parquet")
    problems = validate(tmp_path / "l")["problems"]
    assert any(p["file"].endswith("stray.parquet") and "not listed" in p["problem"] for p in problems)
    # A foreign file in place of a shard: same name and size in the manifest.
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    foreign = tmp_path / "l" / "stray.parquet"
    m["shards"][0].update(name="stray.parquet", bytes=foreign.stat().st_size, sha256=storage.sha256_file(foreign),
                          footer_sha256=storage.footer_sha256(foreign))   # a manifest that lies consistently
    (tmp_path / "l" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="stray.parquet: not a labelgen shard"):
        list(ShardReader(tmp_path / "l").rows())


def test_kill_during_writing_leaves_no_finished_shard_and_no_manifest(tmp_path):
    out = tmp_path / "l"
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from helpers import assert_stored_coverage, assert_stored_target_logprob, topk_row
        from labelgen.format import Encoding
        from labelgen.shards import ShardWriter
        rng = np.random.default_rng(0)
        with ShardWriter({str(out)!r}, "topk", 8, 300, encoding=Encoding(row_group_rows=4)) as w:
            for i in range(10**9):
                w.write(topk_row(rng, f"e{{i}}", 20, 300, 8))
                if i == 50:
                    print("writing", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob("*.tmp")), "the shard in progress should exist only as .tmp"
    assert not list(out.glob("*.parquet"))
    assert not (out / "manifest.json").exists()
    with pytest.raises(FormatError, match="no manifest"):
        ShardReader(out)


def test_inspect_numbers_match_hand_computed_values(tmp_path):
    k, V = 2, 100
    # Four positions with coverage 0.5, 0.8, 0.95, 1.0; ranks 0, 1, 2, 5 (two inside top-2).
    lps = np.log(np.array([[0.3, 0.2], [0.5, 0.3], [0.6, 0.35], [0.5, 0.5]], dtype=np.float64)).astype(np.float32)
    row = {"example_id": "a", "input_ids": np.array([1, 2, 3, 4, 5]), "topk_ids": np.array([[1, 2]] * 4),
           "topk_logprobs": lps, "coverage": np.exp(lps.astype(np.float64)).sum(1),
           "target_logprob": lps[:, 0], "target_rank": np.array([0, 1, 2, 5])}
    from labelgen.tools.inspection import inspect
    write_set(tmp_path / "l", [row], k, V)
    r = inspect(tmp_path / "l")
    size = (tmp_path / "l" / "shard-000000.parquet").stat().st_size
    assert r["positions"] == 4 and r["rows"] == 1 and r["bytes"] == size
    assert r["bytes_per_position"] == pytest.approx(size / 4)
    assert r["bytes_per_entry"] == pytest.approx(size / 8)
    assert r["ratio_vs_raw_topk"] == pytest.approx(4 * 2 * 8 / size)
    assert r["ratio_vs_full_bf16"] == pytest.approx(4 * V * 2 / size)
    md = pq.ParquetFile(tmp_path / "l" / "shard-000000.parquet").metadata.row_group(0)
    ids_col = next(md.column(j) for j in range(md.num_columns) if md.column(j).path_in_schema.startswith("topk_ids"))
    assert r["bytes_by_column"]["topk_ids"] == ids_col.total_compressed_size
    assert sum(r["bytes_by_column"].values()) == size and r["bytes_by_column"]["footers"] > 0
    # coverage is stored to 1/510 in sqrt(1 - coverage): within 2/510 of each value, less on average
    assert r["coverage_mean"] == pytest.approx((0.5 + 0.8 + 0.95 + 1.0) / 4, abs=1e-3)
    assert r["coverage_p50"] == pytest.approx(0.8, abs=2e-4)
    assert r["coverage_below_0.9"] == pytest.approx(0.5)
    assert r["coverage_below_0.99"] == pytest.approx(0.75)
    assert r["target_in_topk"] == pytest.approx(0.5)


def test_estimate_shows_the_5e17_byte_figure_when_asked():
    from labelgen.tools.inspection import estimate, format_estimate
    e = estimate(5e12, 100_000, 64)
    assert e["bytes"]["full_fp8"] == 5e17
    assert e["bytes"]["full_bf16"] == 1e18
    # uint32 ids (100k > 65536) + uint16 gap, plus 12 bytes per position.
    assert e["bytes"]["labels"] == pytest.approx(5e12 * (64 * 6 + 12))
    assert "500,000,000 GB" in format_estimate(e, full=True)
    assert "full vocabulary (" not in format_estimate(e) and "--full" in format_estimate(e)   # one line, not three


def test_estimate_from_a_label_set_uses_its_measured_bytes_and_says_what_it_scaled(tmp_path, rng):
    from labelgen.tools.inspection import estimate, inspect
    write_set(tmp_path / "l", [topk_row(rng, f"e{i}", 30, 300, 8) for i in range(5)], 8, 300)
    measured = inspect(tmp_path / "l")
    e = estimate(1e9, None, None, tmp_path / "l")   # k and V from the set: nothing scaled
    assert (e["k"], e["vocab"], e["warnings"]) == (8, 300, [])
    assert e["bytes"]["labels"] == pytest.approx(1e9 * measured["bytes_per_position"])
    e = estimate(1e9, 300, 4, tmp_path / "l")
    assert e["bytes_per_position"] == pytest.approx(measured["bytes_per_position"] / 2)
    assert len(e["warnings"]) == 1 and "measured at k=8: k=4 scaled by bytes per entry" in e["warnings"][0]
    e = estimate(1e9, 152_064, None, tmp_path / "l")   # 8 ids a position, each log2(152064 / 300) bits more
    assert e["bytes_per_position"] == pytest.approx(measured["bytes_per_position"] + 8 * np.log2(152_064 / 300) / 8)
    assert "measured at V=300: ids of V=152,064 estimated at +8.99 bits each" in e["warnings"][0]
    with pytest.raises(OptionError, match="--k 16: .* holds top-8; a larger k cannot be read from it"):
        estimate(1e9, None, 16, tmp_path / "l")


def test_estimate_measures_sampled_sets_by_their_distinct_ids(tmp_path, rng):
    from labelgen.tools.inspection import estimate, inspect
    V, draws = 300, 12
    with ShardWriter(tmp_path / "s", "sampled", draws, V) as w:
        for i in range(6):
            lengths = rng.integers(1, draws + 1, 9)
            ids = np.concatenate([np.sort(rng.choice(V, n, replace=False)) for n in lengths])
            counts = np.concatenate([[draws - n + 1] + [1] * (n - 1) for n in lengths])   # N draws per position
            w.write({"example_id": f"s{i}", "input_ids": rng.integers(0, V, 10), "sampled_lengths": lengths,
                     "sampled_ids": ids, "sampled_counts": counts,
                     "sampled_logprobs": -rng.random(ids.size) * 5})
    measured = inspect(tmp_path / "s")
    e = estimate(5e12, None, None, tmp_path / "s")
    assert e["k"] == draws and e["bytes"]["labels"] == pytest.approx(5e12 * measured["bytes_per_position"])
    assert "12 draws" in e["source"]
    e = estimate(5e12, 600, None, tmp_path / "s")   # one more bit per distinct id
    assert e["bytes_per_position"] == pytest.approx(measured["bytes_per_position"] + measured["unique_per_position"] / 8)
    with pytest.raises(OptionError, match="--k 50: .* holds 12 draws per position"):
        estimate(5e12, None, 50, tmp_path / "s")


def test_ids_are_renumbered_by_how_often_the_first_row_group_proposes_them(tmp_path, rng):
    k, V = 4, 300
    rows = [topk_row(rng, f"e{i}", 12, V, k) for i in range(6)]
    for r in rows:   # id 299 in every position: the most frequent candidate
        r["topk_ids"][:, -1] = 299
    write_set(tmp_path / "l", rows, k, V, encoding=Encoding(row_group_rows=4))
    reader = ShardReader(tmp_path / "l")
    pf = reader.open_shard(reader.shards[0])
    table = fmt.IdMap.from_meta(pf.metadata.metadata[fmt.ID_TABLE_FOOTER_KEY], V, "shard").table
    assert table[0] == 299 and len(set(table.tolist())) == len(table)
    # stored once: not in the labelgen metadata, so not in pyarrow's copy of the schema either
    assert fmt.ID_TABLE_KEY not in fmt.read_file_metadata(pf.schema_arrow.metadata, "shard")
    assert table.astype("<u2").tobytes() not in base64.b64decode(pf.metadata.metadata[b"ARROW:schema"])
    stored = pf.read_row_group(0, columns=["topk_ids"]).column(0).combine_chunks().flatten().to_numpy()
    assert stored.reshape(-1, k)[:, 0].max() == 0   # each position's first stored delta is the renumbered 299 (= 0)
    for a, b in zip(rows, reader.rows()):
        assert_same_entries(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], Encoding())


def test_labels_written_before_format_1_2_still_load(tmp_path, rng):
    rows = [topk_row(rng, f"e{i}", 9, 200, 4) for i in range(5)]
    enc = Encoding(id_map="none", logprob_codec="u8", position_codec="f32")
    write_set(tmp_path / "l", rows, 4, 200, encoding=enc)
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    m["format_version"] = "1.1"   # a 1.1 manifest knew neither the id map, the sqrt codec nor the 2.0 columns
    for key in ("id_map", "id_map_size", "sqrt_step", "variable_k", "position_codec"):
        del m["encoding"][key]
    (tmp_path / "l" / "manifest.json").write_text(json.dumps(m))
    reader = ShardReader(tmp_path / "l")
    assert reader.encoding.id_map == "none" and reader.encoding.position_codec == "f32"
    for a, b in zip(rows, reader.rows()):
        assert_same_entries(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], enc)
        assert_position_columns_within_documented_error(a, b, enc)


def test_shards_written_before_format_2_keep_their_id_table_in_the_labelgen_metadata(tmp_path, rng):
    """1.2/1.3 shards carry the id table inside the labelgen JSON; they still decode."""
    rows = [topk_row(rng, f"e{i}", 9, 300, 4) for i in range(5)]
    enc = Encoding(position_codec="f32")
    write_set(tmp_path / "l", rows, 4, 300, encoding=enc)
    shard = tmp_path / "l" / "shard-000000.parquet"
    pf = pq.ParquetFile(shard)
    info = fmt.read_file_metadata(pf.schema_arrow.metadata, "shard")
    info.update(format_version="1.3", id_table=pf.metadata.metadata[fmt.ID_TABLE_FOOTER_KEY].decode())
    data = pf.read()
    pq.write_table(data.replace_schema_metadata({fmt.FILE_META_KEY: json.dumps(info).encode()}), shard,
                   **fmt.parquet_writer_options("topk", enc))
    assert fmt.ID_TABLE_FOOTER_KEY not in pq.ParquetFile(shard).metadata.metadata
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    m["format_version"] = "1.3"
    del m["encoding"]["position_codec"]
    m["shards"][0].update(bytes=shard.stat().st_size, sha256=storage.sha256_file(shard),
                          footer_sha256=storage.footer_sha256(shard))
    (tmp_path / "l" / "manifest.json").write_text(json.dumps(m))
    for a, b in zip(rows, ShardReader(tmp_path / "l", verify=True).rows()):
        assert_same_entries(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], enc)


@pytest.mark.parametrize("table, message", [([3, 3], "repeated ids"), ([7, 500], "outside"), ([-1], "outside")])
def test_an_id_table_that_is_not_a_renumbering_is_refused(table, message):
    with pytest.raises(FormatError, match=message):
        fmt.IdMap(np.array(table), 100)


def test_sqrt_codec_error_is_bounded_in_sqrt_probability():
    enc = Encoding()
    lp = np.log(np.linspace(1e-9, 1, 20001))
    decoded = fmt.decode_logprobs(fmt.encode_logprobs(lp[None], enc), enc)[0]
    assert enc.error(lp, decoded).max() <= enc.max_error + 1e-7
    assert (decoded <= 0).all() and np.isfinite(decoded).all()


def test_sampled_ids_round_trip_through_the_id_table(tmp_path, rng):
    V, draws = 400, 20
    rows = []
    for i in range(9):
        lengths = rng.integers(1, 6, size=7)
        ids = np.concatenate([np.sort(rng.choice(V, n, replace=False)) for n in lengths])
        counts = np.concatenate([rng.multinomial(draws - n, [1 / n] * n) + 1 for n in lengths])
        rows.append({"example_id": f"s{i}", "input_ids": rng.integers(0, V, 8), "sampled_lengths": lengths,
                     "sampled_ids": ids, "sampled_counts": counts, "sampled_logprobs": -rng.random(ids.size) * 5})
    with ShardWriter(tmp_path / "s", "sampled", draws, V, encoding=Encoding(row_group_rows=2)) as w:
        for r in rows:
            w.write(r)
    for a, b in zip(rows, ShardReader(tmp_path / "s").rows()):
        np.testing.assert_array_equal(a["sampled_lengths"], b["sampled_lengths"])
        starts = np.cumsum(a["sampled_lengths"])[:-1]
        for ia, ca, la, ib, cb, lb in zip(*(np.split(x, starts) for x in (
                a["sampled_ids"], a["sampled_counts"], a["sampled_logprobs"],
                b["sampled_ids"], b["sampled_counts"], b["sampled_logprobs"]))):
            order = np.argsort(ib)
            np.testing.assert_array_equal(ia, ib[order])
            np.testing.assert_array_equal(ca, cb[order])
            assert np.abs(la - lb[order]).max() <= Encoding().u8_range / 510 + 1e-6


def test_row_groups_close_at_a_bound_on_their_values_as_well_as_their_rows(tmp_path, rng, monkeypatch):
    """Wide rows (large k, long windows) make smaller row groups, so what a reader decodes at
    once stays bounded; the rows read back are the rows written."""
    from labelgen.shards import writer
    k, V = 16, 500
    rows = [topk_row(rng, f"ex{i}", 40, V, k) for i in range(20)]
    per_row = writer._values(rows[0])
    assert per_row >= 2 * 39 * k   # ids and logprobs of 39 positions, at least
    monkeypatch.setattr(writer, "ROW_GROUP_VALUES", 3 * per_row)
    write_set(tmp_path / "l", rows, k, V, encoding=Encoding(row_group_rows=128))
    [shard] = sorted((tmp_path / "l").glob("shard-*.parquet"))
    md = pq.ParquetFile(shard).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [3, 3, 3, 3, 3, 3, 2]
    out = list(ShardReader(tmp_path / "l", verify=True).rows())
    assert [r["example_id"] for r in out] == [r["example_id"] for r in rows]
    for a, b in zip(rows, out):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert_same_entries(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], Encoding())
