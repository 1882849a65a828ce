"""Shared fixtures: tiny teachers built locally (no hub), tiny data in tmp_path.

The suite runs on 2 pytest-xdist workers (`make test`, `--dist loadfile`): a
fixture that builds files (the tiny teacher, the corpus, label sets) is built
once per run by whichever worker asks first (`built_once`), and the other
waits for it and reads the same directory; a module's tests, and so its
servers and module fixtures, stay on one worker. The tests that run a real
system (Slurm, vLLM, Ray, the GCS emulator, Chromium, PyPI) are marked
`integration`: `make test-fast` leaves them out."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread a worker (and for the processes it starts): 2 workers on 2 cores, not 4 spinning OpenMP threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

import helpers


def built_once(tmp_path_factory, name: str, build) -> "os.PathLike":
    """A directory `build(dir)` fills, made once per test run: under xdist every worker's basetemp sits in the
    run's own, so the first worker to get here builds (under a file lock) and the others reuse what it made."""
    from pathlib import Path
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d, done = Path(root) / f"built-{name}", Path(root) / f"built-{name}.done"
    with FileLock(str(d) + ".lock"):
        if not done.is_file():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            build(d)
            done.touch()
    return d


@pytest.fixture
def rng():
    return np.random.default_rng(0)


TINY = dict(vocab_size=512, hidden_size=128, layers=2, heads=2, seq_len=64, batch_size=8, steps=150,
            corpus_bytes=300_000, max_positions=512)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 2-layer Llama (head_dim 64) and BPE tokenizer trained briefly on stdlib source."""
    from labelgen.tools.demo import DemoTeacherConfig, build_demo_teacher
    return str(built_once(tmp_path_factory, "teacher",
                          lambda d: build_demo_teacher(d, None, DemoTeacherConfig(**TINY), log=None)))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """JSONL documents of Python source (long ones get split into windows) and prompts."""
    import json
    from labelgen.tools.demo import read_corpus

    def build(d):
        texts = read_corpus(None, 2_000_000)
        with open(d / "docs.jsonl", "w") as f:
            for i, t in enumerate(texts[:24]):
                f.write(json.dumps({"id": f"doc{i}", "text": t[: 200 + 97 * i]}) + "\n")
        with open(d / "prompts.jsonl", "w") as f:
            for i in range(5):
                f.write(json.dumps({"prompt": f"def function_{i}(",
                                    "messages": [{"role": "user", "content": f"write f{i}"}]}) + "\n")
    return built_once(tmp_path_factory, "corpus", build)


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
    return built_once(tmp_path_factory, "topk_labels", lambda d: run(GenerateConfig(
        teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(d / "topk"), k=16, max_seq_len=64,
        rows_per_shard=4, progress=False, encoding={"row_group_rows": 4}, device="cpu"))) / "topk"


@pytest.fixture(scope="session")
def student_config(tmp_path_factory):
    import json
    return str(built_once(tmp_path_factory, "student", lambda d: (d / "student.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 512,
        "tie_word_embeddings": True}))) / "student.json")


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
    return built_once(tmp_path_factory, "sampled_labels", lambda d: run(GenerateConfig(
        teacher=tiny_teacher, inputs=(str(corpus / "docs.jsonl"),), out=str(d / "s"), mode="sampled", draws=20,
        max_seq_len=64, rows_per_shard=8, progress=False, device="cpu",
        encoding={"sampled_coverage": True}))) / "s"   # the tail-bucket case needs the coverage column


@pytest.fixture(scope="session")
def scored_labels(tiny_teacher, corpus, tmp_path_factory):
    """The tiny teacher's completions of the prompts, scored by itself (--mode score)."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run

    def build(d):
        run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "prompts.jsonl"),), out=str(d / "samples"),
                           mode="sample", prompt_field="prompt", n=2, max_new_tokens=8, temperature=1.0, top_p=1.0,
                           progress=False, device="cpu"))
        run(GenerateConfig(teacher=tiny_teacher, inputs=(str(d / "samples"),), out=str(d / "s"), mode="score", k=8,
                           progress=False, device="cpu"))
    return built_once(tmp_path_factory, "scored_labels", build) / "s"


@pytest.fixture(scope="session")
def chats(tmp_path_factory):
    """12 two-turn conversations (user, assistant, user, assistant) of stdlib source, in a messages field."""
    import json
    from labelgen.tools.demo import read_corpus

    def build(d):
        source, at = "".join(read_corpus(None, 100_000)), 0
        with open(d / "chats.jsonl", "w") as f:
            for i in range(12):
                turns = []
                for j in range(4):   # turns of 30 to 170 characters
                    turns.append(source[at:at + 30 + 10 * i + 7 * j])
                    at += len(turns[-1])
                f.write(json.dumps({"id": f"chat{i}", "messages": [
                    {"role": role, "content": turn} for role, turn in zip(("user", "assistant") * 2, turns)]}) + "\n")
    return built_once(tmp_path_factory, "chats", build) / "chats.jsonl"


@pytest.fixture(scope="session")
def chat_labels(tiny_teacher, chats, tmp_path_factory):
    """Top-16 labels of the tiny teacher over the two-turn chats, windows of 64 tokens: they mark the assistant's
    tokens (format 2.4)."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    return built_once(tmp_path_factory, "chat_labels", lambda d: run(GenerateConfig(
        teacher=tiny_teacher, inputs=(str(chats),), out=str(d / "topk"), k=16, max_seq_len=64,
        messages_field="messages", id_field="id", rows_per_shard=4, progress=False,
        encoding={"row_group_rows": 4}, device="cpu"))) / "topk"


def pytest_collection_modifyitems(config, items):
    """Under xdist (`--dist loadfile`: a module's tests run on one worker, so its module-scoped fixtures, servers
    and browsers are built once), the modules that run a real system come first: each is a long unit, best begun
    while the other worker deals the rest. A test that drives Chromium is `integration` too."""
    for item in items:
        if "chrome" in getattr(item, "fixturenames", ()):   # a real browser (Debian's chromium)
            item.add_marker(pytest.mark.integration)
    real = {item.module.__name__ for item in items if item.get_closest_marker("integration")}
    items.sort(key=lambda item: item.module.__name__ not in real)   # stable: each module's order is kept
