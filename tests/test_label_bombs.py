"""Decompression bombs in every column of every record kind, and row groups
that declare more rows than the format's writers make: validate, inspect and
the training loader each refuse them in one line, in bounded memory."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from labelgen import format as fmt
from labelgen.generate.config import GenerateConfig

BOMB_BYTES = 96 << 20   # above the 64 MiB a row group may always hold: refused by its expansion


@pytest.fixture(scope="module")
def every_kind(tiny_teacher, corpus, tmp_path_factory):
    """A small label set of every record kind, made by `labelgen generate`."""
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
