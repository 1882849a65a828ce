"""`labelgen inspect LABELS --html page.html`: one self-contained page to
look at a label set — its identity, sizes and coverage (inspect's figures),
and an example browser: each token of an example coloured by a measure,
the stored labels of the position that predicted it under the pointer.

The page is html/page.html with html/page.css and html/page.js inlined and
the data as one JSON document in a <script type="application/json"> block,
escaped so that nothing from the label set can end it: token strings,
example ids and config values are data, set as text by the script, never
markup. Arrays travel as base64 of little-endian typed arrays (a few MB for
8 examples of 4,096 positions of top-64). The set is validated first, as
`labelgen validate` does: a damaged set is refused, never rendered."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.errors import FormatError, OptionError
from labelgen.shards import ShardReader
from labelgen.store import storage

ASSETS = Path(__file__).parent / "html"   # the page's HTML, CSS and script: package data (pyproject.toml)
DEFAULT_EXAMPLES = 8
PROB_SCALE = 65535   # probabilities travel as uint16 codes: p ~ code / PROB_SCALE, within 8e-6


def _packed(a: np.ndarray, dtype: str) -> list:
    """[dtype, base64 of `a` as that little-endian typed array] (page.js's `unpack` reads it)."""
    np_type = {"u8": "<u1", "u16": "<u2", "u32": "<u4", "i32": "<i4", "f32": "<f4"}[dtype]
    return [dtype, base64.b64encode(np.ascontiguousarray(a, dtype=np_type).tobytes()).decode("ascii")]


def _probs(logprobs: np.ndarray) -> list:
    return _packed(np.rint(np.exp(logprobs.astype(np.float64)) * PROB_SCALE), "u16")


def _example(kind: str, row: dict, id_type: str) -> dict:
    """One row as the page draws it: its tokens, the index of the first token whose prediction is labelled, and
    per labelled position its stored labels (ragged lists as lengths + a flat array)."""
    ex = {"id": str(row[fmt.EXAMPLE_ID])}
    if kind == "samples":
        ex.update(prompt=_packed(row[fmt.PROMPT_IDS], id_type), tokens=_packed(row[fmt.COMPLETION_IDS], id_type),
                  logprob=_packed(row[fmt.COMPLETION_LOGPROBS], "f32"), sample=int(row[fmt.SAMPLE_INDEX]),
                  finish=str(row[fmt.FINISH_REASON]))
        return ex
    ids = row[fmt.INPUT_IDS]
    ex["tokens"] = _packed(ids, id_type)
    if fmt.WINDOW_OFFSET in row:
        ex["offset"] = int(row[fmt.WINDOW_OFFSET])
    if kind == "tokens":
        return ex
    if kind == "sampled":
        ex.update(first=1, lens=_packed(row[fmt.SAMPLED_LENGTHS], "u16"), ids=_packed(row[fmt.SAMPLED_IDS], id_type),
                  counts=_packed(row[fmt.SAMPLED_COUNTS], "u16"))
        if fmt.COVERAGE in row:
            ex["cov"] = _packed(row[fmt.COVERAGE], "f32")
        return ex
    topk_ids, topk_lp = row[fmt.TOPK_IDS], row[fmt.TOPK_LOGPROBS]
    n, k = topk_ids.shape
    lens = row[fmt.TOPK_LENGTHS] if fmt.TOPK_LENGTHS in row else np.full(n, k)
    keep = np.arange(k)[None, :] < lens[:, None]
    ex.update(first=len(ids) - n, lens=_packed(lens, "u16"), ids=_packed(topk_ids[keep], id_type),
              probs=_probs(topk_lp[keep]), cov=_packed(row[fmt.COVERAGE], "f32"),
              tlp=_packed(row[fmt.TARGET_LOGPROB], "f32"), rank=_packed(row[fmt.TARGET_RANK], "i32"))
    if kind == "scored":
        ex.update(sample=int(row[fmt.SAMPLE_INDEX]), slp=_packed(row[fmt.SAMPLING_LOGPROB], "f32"))
    return ex


def _token_texts(reader: ShardReader, used: set[int]) -> dict[str, str]:
    """The text of each token id in `used`, decoded with the set's tokenizer (no remote code): {id: text}."""
    from transformers import AutoTokenizer
    if not (reader.dir / fmt.TOKENIZER_DIR).is_dir():   # a set written without its tokenizer: ids only
        return {}
    tok = AutoTokenizer.from_pretrained(storage.local_dir(reader.dir / fmt.TOKENIZER_DIR), trust_remote_code=False)
    return {str(i): tok.decode([i], clean_up_tokenization_spaces=False) if i < len(tok) else f"<id {i}>"
            for i in sorted(used)}


def _identity(m: dict, reader: ShardReader) -> dict:
    teacher = m.get("teacher") or {}
    return {"label set": str(reader.dir), "kind": m["kind"], "mode": m.get("mode"),
            "k / draws": m["k"], "vocabulary": m["vocab_size"], "format version": m.get("format_version"),
            "teacher": teacher.get("path"), "backend": teacher.get("backend"), "dtype": teacher.get("dtype"),
            "tokenizer": (m.get("tokenizer") or {}).get("fingerprint"), "shards": len(reader.shards),
            "rows": (m.get("counts") or {}).get("rows"), "positions": (m.get("counts") or {}).get("positions"),
            "encoding": m.get("encoding"), "config": m.get("config"), "created": m.get("created")}


MAX_EXAMPLES = 5_000
"""The most examples a page carries: each is inline JSON (a 2.6 MB set's 200,000 windows made a 49 MB page that a
browser could not open)."""


def build(label_dir: Path | str, examples: int = DEFAULT_EXAMPLES) -> str:
    """The page of the label set in `label_dir` (validated first), carrying its first `examples` rows."""
    from labelgen.tools.inspection import inspect, validate
    if not 1 <= examples <= MAX_EXAMPLES:
        raise OptionError(f"--examples: between 1 and {MAX_EXAMPLES:,}, got {examples:,} (the page carries its "
                          "examples inline; a browser handles a few thousand windows)")
    checked = validate(label_dir, max_problems=1)
    if not checked["ok"]:
        p = checked["problems"][0]
        raise FormatError(f"{p['file']}: {p['problem']}; the label set fails validation (labelgen validate "
                          f"{label_dir}) and is not rendered")
    reader = ShardReader(label_dir)
    id_type = "u16" if reader.vocab_size <= 1 << 16 else "u32"
    rows, used = [], set()
    for row in reader.rows():
        rows.append(_example(reader.kind, row, id_type))
        for column in (fmt.INPUT_IDS, fmt.PROMPT_IDS, fmt.COMPLETION_IDS, fmt.TOPK_IDS, fmt.SAMPLED_IDS):
            if column in row:   # the ids whose text the page shows: its tokens and stored entries
                used.update(np.unique(row[column]).tolist())
        if len(rows) == examples:
            break
    summary = inspect(label_dir)
    data = {"kind": reader.kind, "identity": _identity(reader.manifest, reader), "summary": summary,
            "prob_scale": PROB_SCALE, "examples": rows, "texts": _token_texts(reader, used)}
    return render(data)


def render(data: dict) -> str:
    """page.html with its CSS, script and `data` inlined. The JSON is escaped so that no string in it can close
    the <script> block it sits in or open another (<, >, & and the line separators as \\u escapes)."""
    blob = json.dumps(data, ensure_ascii=True, default=_plain, separators=(",", ":"))
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page, style, script = (storage.read_text(ASSETS / name) for name in ("page.html", "page.css", "page.js"))
    return page.replace("/*STYLE*/", style).replace("/*SCRIPT*/", script).replace("/*DATA*/", blob)


def _plain(value):
    """numpy scalars and arrays in inspect's figures as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write(label_dir: Path | str, out: Path | str, examples: int = DEFAULT_EXAMPLES) -> int:
    """Write the page to `out`, a local file (atomically) or an object (s3://, gs://); its size in bytes. Where
    it cannot go is said before anything is read."""
    from labelgen.store import fsutil
    where = storage.location(str(out))
    if isinstance(where, Path):
        if where.is_dir():
            raise OptionError(f"--html: {out} is a directory; name the page's file (e.g. {where / 'labels.html'})")
        if not where.parent.is_dir():
            raise OptionError(f"--html: {where.parent} is not a directory; create it first, or name a page elsewhere")
    page = build(label_dir, examples).encode("utf-8")
    if isinstance(where, Path):
        fsutil.atomic_write_bytes(where, page)
    else:
        storage.write_bytes(where, page)
    return len(page)
