"""Test helpers: synthetic label rows for format tests (Zipf-like ids, peaked
logprobs) and two-process student-train runs under torchrun."""

from __future__ import annotations

import contextlib

import numpy as np


def assert_stored_coverage(stored, exact) -> None:
    """Coverage as format 2.0 stores it: within 1/510 in sqrt(1 - coverage)."""
    from labelgen.format import TAIL_SQRT_STEP
    root = lambda c: np.sqrt(np.clip(1 - np.asarray(c, np.float64), 0, 1))
    assert np.abs(root(stored) - root(exact)).max() <= TAIL_SQRT_STEP / 2 + 1e-5


def assert_stored_target_logprob(stored, exact, atol: float = 1e-5) -> None:
    """target_logprob as format 2.0 stores it: within 1/128 nat (plus the caller's float slack)."""
    from labelgen.format import TARGET_LOGPROB_STEP
    err = np.abs(np.asarray(stored, np.float64) - np.asarray(exact, np.float64)).max()
    assert err <= TARGET_LOGPROB_STEP / 2 + atol


def peaked_logprobs(rng: np.random.Generator, positions: int, vocab: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [P,k], sorted logprobs [P,k], coverage [P]) from random peaked
    distributions over `vocab` (exact log-softmax, then top-k)."""
    logits = rng.standard_normal((positions, vocab)) * 3.0
    logits[np.arange(positions), rng.integers(0, vocab, positions)] += 8.0
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, axis=1)
    return ids, top.astype(np.float32), np.exp(top).sum(1).astype(np.float32)


def topk_row(rng: np.random.Generator, example_id: str, length: int, vocab: int, k: int) -> dict:
    ids, lp, cov = peaked_logprobs(rng, length - 1, vocab, k)
    inp = rng.integers(0, vocab, length)
    return {
        "example_id": example_id,
        "window_offset": 0,
        "input_ids": inp,
        "topk_ids": ids,
        "topk_logprobs": lp,
        "coverage": cov,
        "target_logprob": lp[:, 0] - 1.0,
        "target_rank": rng.integers(0, 2 * k, length - 1),
    }


def torchrun(port: int, module: str, *args: str):
    """`python -m module ARGS` in 2 processes under torchrun (gloo on CPU); fails the test with its stderr."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", module, *args, "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun_student_train(port: int, *args: str) -> None:
    """`student-train ARGS` in 2 processes under torchrun."""
    torchrun(port, "student_train.cli", *args)


BUCKET = "labels"   # the bucket of the `s3` fixture (conftest.py)


def upload(client, local_dir, prefix) -> str:
    for p in sorted(local_dir.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            client.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(local_dir)}")
    return f"s3://{BUCKET}/{prefix}"


class MotoServer:
    """moto's S3 server on loopback, in a thread, counting what it is asked:
    `requests` lists (method, path) of every request (a WSGI middleware round
    moto's app, as its ThreadedMotoServer serves it)."""

    def __init__(self):
        import logging
        import threading

        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server
        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
        self.requests: list[tuple[str, str]] = []
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            return app(environ, start_response)
        self._server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@contextlib.contextmanager
def silent_server():
    """A TCP server on loopback that accepts connections and never answers: (its port, the connections it
    accepted so far). A store, metadata server or Ray head that hangs."""
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def serve():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        server.close()
        for c in accepted:
            c.close()


def wait_for(condition, proc, limit: float = 300) -> None:
    """Poll until `condition()` holds (fails if the process `proc` ends first or the limit passes)."""
    import time
    end = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"ended early: {proc.communicate()}"
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.1)


def slow_teacher(seconds: float) -> str:
    """Python to run before labelgen's CLI: the hf teacher sleeps `seconds` per batch, so a run is still going
    when a test's poll sees its first output and signals it, however fast the machine."""
    return f"""
import time
from labelgen.backends import hf
_score = hf.HFTeacher.score
def score(self, windows, k):
    time.sleep({seconds})
    return _score(self, windows, k)
hf.HFTeacher.score = score
"""


def one_line_error(stderr: str, program: str) -> str:
    """The one `program: ...` line of a refused command's stderr (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{program}:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def write_jsonl(path, rows) -> None:
    """`rows` as JSON lines at `path`, with a modification time newer than the file's before (even within one
    clock tick), as an edited input has."""
    import json
    import os
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.utime(path, ns=(before + 10**9, before + 10**9))


def generate_by_workers(teacher, inp, out, workers: int, **kw) -> None:
    """Top-4 labels of `inp` by `workers` data-parallel workers run one after another (then finalize)."""
    from labelgen.generate import run
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate.finalize import finalize
    for w in range(workers):
        run(GenerateConfig(teacher=teacher, inputs=(str(inp),), out=str(out), k=4, max_seq_len=32, rows_per_shard=2,
                           progress=False, device="cpu", num_workers=workers, worker_index=w, **kw))
    if workers > 1:
        finalize(str(out))
