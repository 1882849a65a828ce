"""Shared fixtures: tiny teachers built locally (no hub), tiny data in tmp_path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

import helpers


@pytest.fixture
def rng():
    return np.random.default_rng(0)


TINY = dict(vocab_size=512, hidden_size=128, layers=2, heads=2, seq_len=64, batch_size=8, steps=150,
            corpus_bytes=300_000, max_positions=512)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 2-layer Llama (head_dim 64) and BPE tokenizer trained briefly on stdlib source."""
    from labelgen.tools.demo import DemoTeacherConfig, build_demo_teacher
    return str(build_demo_teacher(tmp_path_factory.mktemp("teacher"), None, DemoTeacherConfig(**TINY), log=None))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """JSONL documents of Python source (long ones get split into windows) and prompts."""
    import json
    from labelgen.tools.demo import read_corpus
    d = tmp_path_factory.mktemp("corpus")
    texts = read_corpus(None, 2_000_000)
    with open(d / "docs.jsonl", "w") as f:
        for i, t in enumerate(texts[:24]):
            f.write(json.dumps({"id": f"doc{i}", "text": t[: 200 + 97 * i]}) + "\n")
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"prompt": f"def function_{i}(", "messages": [{"role": "user", "content": f"write f{i}"}]}) + "\n")
    return d


@pytest.fixture(scope="session")
def vllm_teacher(tiny_teacher):
    """One vLLM engine (CPU build here) shared by every vLLM test."""
    from transformers import AutoTokenizer
    from labelgen.backends.vllm import VLLMTeacher
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = VLLMTeacher(tiny_teacher, tok, max_logprobs=64, engine={"gpu_memory_utilization": 0.2, "max_model_len": 512})
    yield teacher
    teacher.close()


@pytest.fixture(scope="session")
def topk_labels(tiny_teacher, corpus, tmp_path_factory):
    """Top-16 labels of the tiny teacher over the corpus: 6 shards, small row groups."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    out = tmp_path_factory.mktemp("labels") / "topk"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(out), k=16, max_seq_len=64,
                       rows_per_shard=4, progress=False, encoding={"row_group_rows": 4}, device="cpu"))
    return out


@pytest.fixture(scope="session")
def student_config(tmp_path_factory):
    import json
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                                "max_position_embeddings": 512, "tie_word_embeddings": True}))
    return str(path)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on localhost (its in-process mock does not reach
    pyarrow's C++ client) and the environment that points pyarrow and boto3
    at it; "requests" lists (method, path) of every request it answers."""
    import boto3
    from labelgen.store import storage
    server = helpers.MotoServer()
    port = server.port
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.setenv("LABELGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    storage.filesystem.cache_clear()
    storage._boto3_client.cache_clear()
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=helpers.BUCKET)
    yield {"client": client, "env": env, "requests": server.requests}
    storage.filesystem.cache_clear()
    storage._boto3_client.cache_clear()
    mp.undo()
    server.stop()


@pytest.fixture(scope="session")
def sampled_labels(tiny_teacher, corpus, tmp_path_factory):
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    out = tmp_path_factory.mktemp("sampled") / "s"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(out), mode="sampled",
                       draws=20, max_seq_len=64, rows_per_shard=8, progress=False, device="cpu",
                       encoding={"sampled_coverage": True}))   # the tail-bucket case needs it
    return out


@pytest.fixture(scope="session")
def scored_labels(tiny_teacher, corpus, tmp_path_factory):
    """The tiny teacher's completions of the prompts, scored by itself (--mode score)."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    d = tmp_path_factory.mktemp("scored")
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "prompts.jsonl"),), out=str(d / "samples"),
                       mode="sample", prompt_field="prompt", n=2, max_new_tokens=8, temperature=1.0, top_p=1.0,
                       progress=False, device="cpu"))
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(d / "samples"),), out=str(d / "s"), mode="score", k=8,
                       progress=False, device="cpu"))
    return d / "s"


@pytest.fixture(scope="session")
def chats(tmp_path_factory):
    """12 two-turn conversations (user, assistant, user, assistant) of stdlib source, in a messages field."""
    import json
    from labelgen.tools.demo import read_corpus
    source, at = "".join(read_corpus(None, 100_000)), 0
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            turns = []
            for j in range(4):   # turns of 30 to 170 characters
                turns.append(source[at:at + 30 + 10 * i + 7 * j])
                at += len(turns[-1])
            f.write(json.dumps({"id": f"chat{i}", "messages": [
                {"role": role, "content": turn} for role, turn in zip(("user", "assistant") * 2, turns)]}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_labels(tiny_teacher, chats, tmp_path_factory):
    """Top-16 labels of the tiny teacher over the two-turn chats, windows of 64 tokens: they mark the assistant's
    tokens (format 2.4)."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    out = tmp_path_factory.mktemp("chat_labels") / "topk"
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(chats),), out=str(out), k=16, max_seq_len=64,
                       messages_field="messages", id_field="id", rows_per_shard=4, progress=False,
                       encoding={"row_group_rows": 4}, device="cpu"))
    return out
