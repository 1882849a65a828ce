"""The manifest: a label set's table of contents, written last, and the
identities (dataset and tokenizer fingerprints) readers check against."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from labelgen.format.codec import MAX_VOCAB
from labelgen.format.schema import (FORMAT_NAME, KINDS, MANIFEST_NAME, SHARD_SUFFIX, Encoding, FormatError,
                                    check_version)
from labelgen.store import storage


def dataset_fingerprint(manifest: dict) -> str:
    """Identity of a label set: format, kind, tokenizer and every shard's bytes."""
    ident = {
        "format_version": manifest["format_version"],
        "kind": manifest["kind"],
        "tokenizer": manifest.get("tokenizer", {}).get("fingerprint"),
        "shards": [(s["name"], s["bytes"], s["sha256"]) for s in manifest["shards"]],
    }
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def write_manifest(out_dir, manifest: dict, name: str = MANIFEST_NAME, if_absent: bool = False) -> dict:
    """Write the manifest (last: it makes the label set) into a directory or
    bucket prefix; `if_absent`: fail (storage.AlreadyExists) when one is there."""
    manifest = dict(manifest)
    manifest["fingerprint"] = dataset_fingerprint(manifest)
    storage.write_bytes(storage.location(out_dir) / name, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(),
                        if_absent=if_absent)
    return manifest


def read_manifest(label_dir: Path | str) -> dict:
    label_dir = storage.location(label_dir)
    path = label_dir / MANIFEST_NAME
    if not path.is_file():
        hint = " (the job did not finish, or run `labelgen finalize` after all workers)" if label_dir.is_dir() else ""
        raise FormatError(f"{path}: no manifest; not a complete label set{hint}")
    try:
        m = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a labelgen manifest (missing \"format\": \"{FORMAT_NAME}\")")
    check_version(m.get("format_version"), str(path))
    for key in ("kind", "k", "vocab_size", "encoding", "shards"):
        if key not in m:
            raise FormatError(f"{path}: manifest lacks {key!r}")
    if m["kind"] not in KINDS:
        raise FormatError(f"{path}: unknown record kind {m['kind']!r}; this version knows {KINDS}")
    check_bounds(m, str(path))
    if not isinstance(m["encoding"], dict):
        raise FormatError(f"{path}: encoding must be a mapping")
    try:
        Encoding.from_dict(m["encoding"])
    except (TypeError, FormatError) as e:
        raise FormatError(f"{path}: bad encoding ({e})") from None
    if not isinstance(m["shards"], list):
        raise FormatError(f"{path}: shards must be a list")
    for i, shard in enumerate(m["shards"]):
        check_shard_entry(shard, f"{path}: shards[{i}]")
    return m


# A label set names its shards; they must be plain files inside it.
MAX_K = 1 << 16


def check_bounds(m: dict, where: str) -> None:
    """The manifest's sizes, which readers allocate by, within what the format allows."""
    V, k = m["vocab_size"], m["k"]
    if not isinstance(V, int) or not 0 < V <= MAX_VOCAB:
        raise FormatError(f"{where}: vocab_size {V!r} outside (0, {MAX_VOCAB}]")
    if not isinstance(k, int) or not 0 <= k <= min(V, MAX_K):
        raise FormatError(f"{where}: k {k!r} outside [0, min(vocab_size, {MAX_K})]")
    seq = (m.get("config") or {}).get("max_seq_len")
    if seq is not None and (not isinstance(seq, int) or not 2 <= seq <= 1 << 24):
        raise FormatError(f"{where}: config.max_seq_len {seq!r} outside [2, 2^24]")


def check_shard_entry(shard: Any, where: str) -> None:
    """A manifest's shard entry: a plain file name (no directories, no '..',
    not hidden) and non-negative integer counts."""
    if not isinstance(shard, dict):
        raise FormatError(f"{where}: not a mapping")
    name = shard.get("name")
    if (not isinstance(name, str) or not name.endswith(SHARD_SUFFIX) or name.startswith(".")
            or "/" in name or "\\" in name or "\0" in name or name != os.path.basename(name)):
        raise FormatError(f"{where}: shard name {name!r} is not a plain file name inside the label directory")
    for key in ("rows", "positions", "bytes"):
        if not isinstance(shard.get(key), int) or shard[key] < 0:
            raise FormatError(f"{where}: {key} {shard.get(key)!r} is not a non-negative integer")
    if not isinstance(shard.get("sha256"), str):
        raise FormatError(f"{where}: sha256 missing")


def tokenizer_fingerprint(tokenizer) -> dict:
    """Fingerprint of a HF tokenizer: vocabulary, merges, special tokens and
    normalisation, with a hash per part so a mismatch can say what differs.
    Two tokenizers with equal fingerprints tokenize alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        ident = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")}
    else:
        ident = {"model": sorted(tokenizer.get_vocab().items())}
    ident["special_tokens"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}

    def h(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": f"sha256:{h(ident)}", "vocab_size": len(tokenizer),
            "parts": {k: h(v)[:16] for k, v in ident.items()}, "special_tokens": ident["special_tokens"]}


def tokenizer_difference(a: dict, b: dict) -> str:
    """What differs between two tokenizer fingerprints, in words."""
    diffs = []
    if a.get("vocab_size") != b.get("vocab_size"):
        diffs.append(f"vocabulary size {a.get('vocab_size')} vs {b.get('vocab_size')}")
    names = {"model": "vocabulary/merges", "added_tokens": "added tokens", "normalizer": "normalizer",
             "pre_tokenizer": "pre-tokenizer", "post_processor": "post-processor", "special_tokens": "special tokens"}
    pa_, pb_ = a.get("parts", {}), b.get("parts", {})
    diffs += [names[k] for k in names if k in pa_ and k in pb_ and pa_[k] != pb_[k]]
    return ", ".join(diffs) or "fingerprints differ"
