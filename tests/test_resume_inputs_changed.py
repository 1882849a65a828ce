"""`generate --resume --inputs-changed`: a record deleted from the input (or
inserted, moved, edited) gives the labels a fresh run on the new input gives,
on local disk and in a bucket, with one worker and with two; finalize refuses
a worker that finished before the inputs changed."""

import json

import numpy as np
import pytest
from helpers import BUCKET, generate_by_workers, write_jsonl

from labelgen import format as fmt
from labelgen.generate import run as generate
from labelgen.generate.config import GenerateConfig
from labelgen.generate.finalize import finalize
from labelgen.shards import ShardReader
from labelgen.tools.inspection import validate

EDITS = {
    "delete_end": lambda r: r[:-2],
    "delete_middle": lambda r: r[:4] + r[5:],
    "insert": lambda r: r[:3] + [{"text": "def inserted():\n    return 42\n"}] + r[3:],
    "reorder": lambda r: r[:2] + [r[3], r[2]] + r[4:],
    "edit": lambda r: r[:6] + [{"text": r[6]["text"] + "\n# edited"}] + r[7:],
}


@pytest.fixture(scope="module")
def records(corpus):
    docs = [json.loads(line) for line in open(corpus / "docs.jsonl")]
    return [{"text": d["text"][:120 + 10 * i]} for i, d in enumerate(docs[:9])]




def label_rows(where) -> list[dict]:
    return list(ShardReader(where).rows())




@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("change", list(EDITS))
def test_resume_with_inputs_changed_equals_a_fresh_run_on_the_new_input(change, store, workers, records, tiny_teacher,
                                                                         tmp_path, request):
    """Every column of every shard equals a fresh run's: shards past the new
    end are gone from the manifest and the store, no record appears twice."""
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records)
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        out = f"s3://{BUCKET}/changed/{change}-{workers}"
    else:
        out = tmp_path / "labels"
    generate_by_workers(tiny_teacher, inp, out, workers)
    before = len(ShardReader(out).shards)
    write_jsonl(inp, EDITS[change](records))
    generate_by_workers(tiny_teacher, inp, out, workers, resume=workers == 1, inputs_changed=True)
    generate_by_workers(tiny_teacher, inp, tmp_path / "fresh", 1)
    got, want = label_rows(out), label_rows(tmp_path / "fresh")
    assert [r[fmt.EXAMPLE_ID] for r in got] == [r[fmt.EXAMPLE_ID] for r in want]
    for x, y in zip(got, want):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(np.asarray(x[key]), np.asarray(y[key])), (x[fmt.EXAMPLE_ID], key)
    shards = len(ShardReader(out).shards)
    assert shards == len(ShardReader(tmp_path / "fresh").shards)
    if change.startswith("delete"):
        assert shards == before - 1
    report = validate(str(out))   # no shard file or object beyond the manifest's
    assert report["ok"], report["problems"]
    if store == "s3":
        keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=out.split("/", 3)[3] + "/")
                .get("Contents", [])]
        assert sum(k.rsplit("/", 1)[1].startswith("shard-") for k in keys) == shards, keys


def test_finalize_refuses_a_worker_that_finished_before_the_inputs_changed(records, tiny_teacher, tmp_path):
    from labelgen.generate.finalize import unfinished_workers
    inp, out = tmp_path / "in.jsonl", tmp_path / "labels"
    write_jsonl(inp, records)
    generate_by_workers(tiny_teacher, inp, out, 2)
    write_jsonl(inp, records[:-2])
    generate(GenerateConfig(teacher=tiny_teacher, inputs=(str(inp),), out=str(out), k=4, max_seq_len=32,
                            rows_per_shard=2, progress=False, device="cpu", num_workers=2, worker_index=0,
                            inputs_changed=True))
    assert unfinished_workers(str(out)) == ([1], 2)
    with pytest.raises(fmt.FormatError, match=r"worker\(s\) 1 finished before the inputs changed"):
        finalize(str(out))
