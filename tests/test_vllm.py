"""vLLM backend tests. They run in CI on vLLM's CPU build (see Makefile);
one engine is shared by the whole session (start-up takes ~40 s)."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from labelgen.backends.hf import HFTeacher
from helpers import assert_stored_target_logprob
from labelgen.format import Encoding, TARGET_LOGPROB_STEP
from labelgen.generate import run
from labelgen.tools.inspection import validate
from test_generate import assert_same_rows, cfg, rows_of

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.integration]


def test_vllm_and_hf_give_the_same_topk(tiny_teacher, vllm_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    hf = HFTeacher(tiny_teacher, tok)
    texts = ["def foo(x):\n    return x + 1\n", "import os\nimport sys\n\nclass A:\n    pass\n", "for i in range(10):\n"]
    windows = [np.asarray(tok(t)["input_ids"]) for t in texts]
    for v, h in zip(vllm_teacher.score(windows, 64), hf.score(windows, 64)):
        np.testing.assert_allclose(v.logprobs, h.logprobs, atol=1e-4)
        # ids agree except where two logprobs tie within tolerance
        untied = np.abs(np.diff(h.logprobs, axis=1, append=-np.inf)) > 1e-4
        untied &= np.abs(np.diff(h.logprobs, axis=1, prepend=np.inf)) > 1e-4
        np.testing.assert_array_equal(v.ids[untied], h.ids[untied])
        np.testing.assert_allclose(v.coverage, h.coverage, atol=1e-4)
        np.testing.assert_allclose(v.target_logprob, h.target_logprob, atol=1e-4)
        np.testing.assert_array_equal(v.target_rank, h.target_rank)


def test_generate_with_vllm_matches_generate_with_hf(tiny_teacher, corpus, vllm_teacher, tmp_path):
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "v", backend="vllm", id_field="id"), teacher=vllm_teacher)
    run(cfg(tiny_teacher, [corpus / "docs.jsonl"], tmp_path / "h", id_field="id"))
    assert validate(tmp_path / "v")["ok"]
    v, h = rows_of(tmp_path / "v"), rows_of(tmp_path / "h")
    assert [r["example_id"] for r in v] == [r["example_id"] for r in h]
    for a, b in zip(v, h):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        # both sides are quantised: allow one step for values that fall on either side of a boundary
        enc = Encoding()
        assert enc.error(np.sort(a["topk_logprobs"], 1), np.sort(b["topk_logprobs"], 1)).max() <= 2 * enc.max_error + 1e-6
        same_set = [set(x) == set(y) for x, y in zip(a["topk_ids"], b["topk_ids"])]
        assert np.mean(same_set) > 0.99
        assert_stored_target_logprob(a["target_logprob"], b["target_logprob"], atol=1e-4 + TARGET_LOGPROB_STEP / 2)


def test_vllm_sampling_reproduces_and_differs_across_examples(tiny_teacher, corpus, vllm_teacher, tmp_path):
    c = dict(backend="vllm", mode="sample", prompt_field="prompt", n=2, max_new_tokens=10, temperature=1.0, top_p=1.0)
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "a", **c), teacher=vllm_teacher)
    run(cfg(tiny_teacher, [corpus / "prompts.jsonl"], tmp_path / "b", **c), teacher=vllm_teacher)
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert_same_rows(a, b)
    assert len({tuple(r["completion_ids"]) for r in a}) == 10
    assert all(len(r["completion_logprobs"]) == len(r["completion_ids"]) and (r["completion_logprobs"] <= 0).all() for r in a)


def test_k_above_the_engine_logprob_limit_is_refused(vllm_teacher):
    with pytest.raises(ValueError, match="--k 65 exceeds the engine's max_logprobs 64"):
        vllm_teacher.score([np.arange(5)], 65)
