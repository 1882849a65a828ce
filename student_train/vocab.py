"""Whether a student fits its labels: the tokenizer they were made with, and
the width of its logits against their ids (padded vocabularies included).
`student-train train` and the transformers.Trainer integration (hf.py) both
check with these."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.format import FormatError
from labelgen.store import storage


def load_tokenizer_for(student: str | None, label_dir: Path, option: str | None = None):
    """The student's own tokenizer if its directory has one, else the labels'
    (or, with `option`, the tokenizer in the directory that option names)."""
    from transformers import AutoTokenizer
    if option:
        if not any((label_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FormatError(f"{option}: {label_dir} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
        return AutoTokenizer.from_pretrained(label_dir, trust_remote_code=False)
    for where in ([Path(student)] if student else []) + [storage.location(label_dir) / fmt.TOKENIZER_DIR]:
        if (where / "tokenizer_config.json").is_file() or (where / "tokenizer.json").is_file():
            try:   # a label set in a bucket: its tokenizer is copied to a local cache first
                return AutoTokenizer.from_pretrained(storage.local_dir(where), trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise FormatError(f"{where}: cannot load the tokenizer ({e})") from None
    raise FormatError(f"{label_dir}: the labels carry no tokenizer ({fmt.TOKENIZER_DIR}/) and the student has none; "
                      "pass --student with a tokenizer")


def check_vocabulary(manifest: dict, tokenizer, model, where: str,
                     cross_option: str = "pass --student-tokenizer DIR") -> int:
    """Refuse a student whose tokenizer differs from the labels'. Returns the
    student's logits width. Rule for padded vocabularies: the student's logits
    may be wider than the tokenizer (extra slots simply never get labels);
    label ids at or beyond the student's width — the teacher's own padding —
    are dropped from the top-k (they carry ~0 probability). `cross_option`
    says how the caller's front end asks for cross-tokenizer training."""
    labels_tok = manifest.get("tokenizer")
    student_tok = fmt.tokenizer_fingerprint(tokenizer)
    if not labels_tok:
        raise FormatError(f"{where}: the manifest has no tokenizer fingerprint; cannot check the student against it")
    if labels_tok["fingerprint"] != student_tok["fingerprint"]:
        raise FormatError(f"{where}: the labels were made with a different tokenizer than the student's "
                          f"(differs in: {fmt.tokenizer_difference(labels_tok, student_tok)}); to distill across "
                          f"tokenizers {cross_option}")
    return check_width(model, tokenizer, where)


def check_width(model, tokenizer, where: str) -> int:
    """The student's logits width, which must cover its tokenizer."""
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tokenizer):
        raise FormatError(f"{where}: the student's logits are {width} wide but its tokenizer has {len(tokenizer)} tokens")
    return width


def check_width_against_labels(manifest: dict, width: int, where: str) -> None:
    """Without the student's tokenizer, its logits width must be one the
    labels name: their tokenizer's length or their id bound (the teacher's
    logits, padding included). Narrower fails mid-run on an id it lacks;
    any other width is most likely another tokenizer's model, which would
    train silently on these ids."""
    tokens = (manifest.get("tokenizer") or {}).get("vocab_size")
    bound = int(manifest["vocab_size"])
    if width not in (tokens, bound):
        raise FormatError(f"{where}: the student's logits are {width} wide, but the labels' tokenizer has {tokens} tokens "
                          f"(ids below {bound}); pass the student's tokenizer (processing_class=...) to check that it is "
                          "the labels' one, or use a student built for it")


def token_byte_lengths(tokenizer, width: int) -> np.ndarray:
    """[width] float32: bytes of each token id's text (0 for special tokens and
    padding slots): with them evaluation reports bits per byte (eval_bpb)."""
    from student_train.xtok import token_bytes
    lengths = np.zeros(width, np.float32)
    pieces = token_bytes(tokenizer)[:width]
    lengths[:len(pieces)] = [len(p) for p in pieces]
    return lengths
