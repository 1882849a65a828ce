"""Cross-tokenizer distillation from offline labels: a student whose
tokenizer differs from the teacher's learns from the same shards.

A label row holds the teacher's input ids, so its text and the byte span of
every teacher token can be recovered. `CrossTokenizer.collate` re-tokenizes
each window's bytes with the student's tokenizer and aligns the two
tokenizations by byte offsets, following the exact-boundary alignment of
GOLD (TRL's `GOLDTrainer`) and DSKD's observation that most tokens share
boundaries:

* a student position is *aligned* when the token it predicts starts at the
  same byte as a teacher token: the teacher's top-k (or drawn ids, for
  sampled labels) at the position predicting that token is its label;
* each teacher candidate is mapped to the student token that begins its
  string (the first token of the candidate's text tokenized alone);
  candidates mapping to the same student token have their mass merged, and
  candidates with no text (special tokens) or no student token go to the
  tail bucket (1 - kept mass) as does everything outside the top-k (a
  drawn id with no student token: dropped by the sampled estimator, its
  share of the drawn mass in the sampled tail bucket);
* unaligned positions — the student predicts a token that starts inside a
  teacher token — get no KD term; CE on the actual next token covers every
  position (the fallback; ULD-style sorted-probability matching there is
  left for later).

The candidate map is one array over the teacher's vocabulary, computed once
per tokenizer pair and cached beside the run. Batches also carry each
target token's byte length, so evaluation reports bits per byte, a unit
that does not depend on the tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from labelgen import format as fmt
from labelgen.errors import one_line
from labelgen.store import fsutil, storage


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for. Byte-level BPE (GPT-2 style:
    Llama 3, Qwen, SmolLM2) and SentencePiece-style vocabularies (▁ for a
    space, <0xNN> byte tokens) are understood; special tokens stand for no
    bytes."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    table = _byte_decoder()
    out = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or tok is None:
            out.append(b"")
        elif byte_level and all(c in table for c in tok):
            out.append(bytes(table[c] for c in tok))
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(tok.replace("▁", " ").encode("utf-8"))
    return out


def candidate_map(teacher_bytes: list[bytes], student, student_bytes: list[bytes]) -> np.ndarray:
    """For each teacher token, the student token its text begins with: the
    first token of the student's tokenization of that text, or, for a piece
    of a multi-byte character (no text of its own), the longest student
    token its bytes begin with. -1: none (special tokens)."""
    out = np.full(len(teacher_bytes), -1, np.int64)
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b:
            by_bytes.setdefault(b, i)
    texts, ids = [], []
    for i, b in enumerate(teacher_bytes):
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            prefixes = (by_bytes.get(b[:n]) for n in range(len(b), 0, -1))
            out[i] = next((j for j in prefixes if j is not None), -1)
            continue
        if text:
            texts.append(text)
            ids.append(i)
    for i, text, enc in zip(ids, texts, student(texts, add_special_tokens=False)["input_ids"]):
        enc = [t for t in enc if student_bytes[t]]
        # Only a student token that is exactly the start of the candidate's text stands for it.
        if enc and text.encode("utf-8").startswith(student_bytes[enc[0]]):
            out[i] = enc[0]
    return out


MAX_NPY_HEADER = 10_000 + 16   # numpy's bound on the header it parses, plus the magic and the length field
CANDIDATE_MAPS = ("candidate_map-*.npy", "candidate_map-*.sha256")   # what a cross-tokenizer run caches in its --out


def _map_digest(key: str, data: bytes) -> str:
    return hashlib.sha256(key.encode() + b"\0" + data).hexdigest()


def save_candidate_map(path: Path, key: str, mapping: np.ndarray) -> None:
    """The map as .npy, and beside it the hash of (tokenizer pair, map bytes) it is checked against."""
    buf = io.BytesIO()
    np.save(buf, mapping.astype(np.int64), allow_pickle=False)
    fsutil.atomic_write_bytes(path, buf.getvalue())
    fsutil.atomic_write_bytes(path.with_suffix(".sha256"), _map_digest(key, buf.getvalue()).encode())


def load_candidate_map(path: Path, key: str, teacher_vocab: int, student_vocab: int) -> np.ndarray | None:
    """A cached map, or None (rebuild it) unless everything about it holds:
    its hash for this tokenizer pair, int64, one entry per teacher token
    (checked in the header, before anything is allocated), values in
    [-1, student vocabulary). A cache beside a run is not trusted blindly:
    wrong values would train silently on wrong targets; one refused is
    said in a warning (it is rebuilt)."""
    def refused(why: str) -> None:
        warnings.warn(f"{path}: {why}; the candidate map is rebuilt", RuntimeWarning, stacklevel=3)
    try:
        data = storage.read_head(path, MAX_NPY_HEADER + 8 * teacher_vocab)
    except FileNotFoundError:
        return None   # not cached yet
    try:
        f = io.BytesIO(data)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
        if read_header is None:
            return refused("not an .npy file of a version numpy writes")
        shape, fortran, dtype = read_header(f)
        if dtype != np.dtype("<i8") or fortran or shape != (teacher_vocab,):
            return refused(f"holds {dtype} {shape}, not int64 ({teacher_vocab},)")
        data = data[:f.tell() + 8 * teacher_vocab]   # the header and the array, no more
        if storage.read_text(path.with_suffix(".sha256"), 1024).strip() != _map_digest(key, data):
            return refused("its hash does not match")
        mapping = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:   # a damaged header surfaces as any error of numpy's parser (SyntaxError, TokenError, ...)
        return refused(f"unreadable ({one_line(e, 200)})")
    if mapping.shape != (teacher_vocab,) or mapping.size and (mapping.min() < -1 or mapping.max() >= student_vocab):
        return refused("ids outside the student's vocabulary")
    return mapping


class CrossTokenizer:
    """Re-tokenizes label rows for a student with its own tokenizer (see the module docstring)."""

    def __init__(self, teacher_tokenizer, student_tokenizer, cache_dir: Path | None = None):
        self.student = student_tokenizer
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.student_bytes = token_bytes(student_tokenizer)
        key = hashlib.sha256((fmt.tokenizer_fingerprint(teacher_tokenizer)["fingerprint"] + "\0"
                              + fmt.tokenizer_fingerprint(student_tokenizer)["fingerprint"]).encode()).hexdigest()[:16]
        cached = Path(cache_dir) / CANDIDATE_MAPS[0].replace("*", key) if cache_dir else None
        self.map = load_candidate_map(cached, key, len(self.teacher_bytes), len(self.student_bytes)) if cached else None
        if self.map is None:
            self.map = candidate_map(self.teacher_bytes, student_tokenizer, self.student_bytes)
            if cached is not None:
                save_candidate_map(cached, key, self.map)

    def window(self, teacher_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(student ids, student token byte lengths, for each student position
        the teacher position whose top-k labels it, or -1, and for each
        student token the teacher token its first byte belongs to), or None
        when the window's text does not round-trip through the student
        tokenizer."""
        pieces = [self.teacher_bytes[int(i)] for i in teacher_ids]
        t_start = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])   # byte where teacher token j starts
        text = b"".join(pieces)
        lead = 0
        while lead < len(text) and (text[lead] & 0xC0) == 0x80:   # a window may start inside a character
            lead += 1
        try:
            decoded = text[lead:].decode("utf-8")
        except UnicodeDecodeError as e:                            # ... or end inside one
            decoded = text[lead:lead + e.start].decode("utf-8")
        ids = self.student(decoded, add_special_tokens=False)["input_ids"]
        lengths = np.asarray([len(self.student_bytes[i]) for i in ids], np.int64)
        body = decoded.encode("utf-8")
        joined = b"".join(self.student_bytes[i] for i in ids)
        if joined != body:
            if joined == b" " + body and lengths.size and lengths[0] > 0:   # a SentencePiece dummy prefix
                lengths[0] -= 1
            else:
                return None
        s_start = lead + np.concatenate([[0], np.cumsum(lengths)])       # byte where student token s starts
        # Teacher position t predicts teacher token t + 1, which starts at t_start[t + 1].
        real = np.asarray([len(p) > 0 for p in pieces[1:]], bool)
        at = {int(b): t for t, b in enumerate(t_start[1:-1]) if real[t]}
        label = np.asarray([at.get(int(b), -1) for b in s_start[1:len(ids)]], np.int64)
        # The last teacher token starting at or before the byte: text-less (special) tokens come before the one
        # with text that starts where they stand.
        source = np.clip(np.searchsorted(t_start[:-1], s_start[:len(ids)], side="right") - 1, 0, len(pieces) - 1)
        return np.asarray(ids, np.int64), lengths, label, source

    def collate(self, columns: dict, rows: np.ndarray | None, k: int | None, vocab_limit: int | None,
                proposal_temperature: float = 1.0, assistant_only: bool = False) -> dict:
        """A student batch from decoded topk, sampled (or tokens) label
        columns: the student's ids and CE targets over every position, KD
        labels (merged onto student ids) where a position is aligned
        (`kd_mask`), and `target_bytes` for bits per byte. `assistant_only`
        (chat labels' assistant_mask) counts a position only when the student
        token it predicts begins inside a teacher token of the assistant's."""
        tokens, t_off = columns[fmt.INPUT_IDS]
        if rows is None:
            rows = np.arange(len(t_off) - 1)
        windows = []
        for r in rows:
            w = self.window(tokens[t_off[r]:t_off[r + 1]])
            if w is None or len(w[0]) < 2:   # nothing to learn from: an empty row of the usual shape
                w = (np.zeros(2, np.int64), np.zeros(2, np.int64), np.full(1, -1, np.int64), np.zeros(2, np.int64))
            windows.append(w)
        B, T = len(windows), max(len(w[0]) for w in windows)
        ids = np.zeros((B, T), np.int64)
        attn = np.zeros((B, T), np.int64)
        mask = np.zeros((B, T - 1), bool)
        target_bytes = np.zeros((B, T - 1), np.float32)
        marks = columns[fmt.ASSISTANT_MASK] if assistant_only else None   # present: the stream checked (set_assistant_only)
        if marks is not None and (np.diff(marks[1])[rows] != np.diff(t_off)[rows]).any():
            raise fmt.FormatError(f"{fmt.ASSISTANT_MASK} and {fmt.INPUT_IDS} differ in length")
        for i, (r, (s_ids, lengths, _, source)) in enumerate(zip(rows, windows)):
            ids[i, :len(s_ids)] = s_ids
            attn[i, :len(s_ids)] = 1
            mask[i, :len(s_ids) - 1] = lengths[1:] > 0
            if marks is not None:   # an empty row's zero lengths already count nothing
                mask[i, :len(s_ids) - 1] &= marks[0][marks[1][r]:marks[1][r + 1]][source[1:]]
            target_bytes[i, :len(s_ids) - 1] = lengths[1:]
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
               "targets": torch.from_numpy(ids[:, 1:].copy()), "mask": torch.from_numpy(mask),
               "target_bytes": torch.from_numpy(target_bytes)}
        if fmt.TOPK_IDS in columns:
            out.update(self._topk(columns, rows, windows, mask, k, vocab_limit))
        elif fmt.SAMPLED_IDS in columns:
            out.update(self._sampled(columns, rows, windows, mask, vocab_limit, proposal_temperature))
        return out

    def _merge(self, teacher_ids: np.ndarray, values: list[np.ndarray], vocab_limit: int | None):
        """Teacher candidates [n, K] with probability-like `values` [n, K]
        (0 = empty slot) -> (student ids [n, K], the values summed over the
        candidates landing on each student id, whether each slot holds one).
        Candidates without a student token are dropped."""
        mapped = self.map[teacher_ids]
        keep = (mapped >= 0) & (values[0] > 0)
        if vocab_limit is not None:
            keep &= mapped < vocab_limit
        # Sort by (position, id), sum each run.
        none = np.iinfo(np.int64).max
        key = np.where(keep, mapped, none)
        order = np.argsort(key, axis=1, kind="stable")
        key = np.take_along_axis(key, order, 1)
        first = np.ones(key.shape, bool)
        first[:, 1:] = key[:, 1:] != key[:, :-1]
        first &= key != none
        slot = np.cumsum(first, axis=1) - 1
        rr, cc = np.nonzero(key != none)
        merged = []
        for v in values:
            v = np.take_along_axis(np.where(keep, v, 0.0), order, 1)
            m = np.zeros(key.shape, np.float64)
            np.add.at(m, (rr, slot[rr, cc]), v[rr, cc])
            merged.append(m)
        present = np.arange(key.shape[1])[None, :] < first.sum(1)[:, None]
        ids_here = np.zeros(key.shape, np.int64)
        ids_here[np.nonzero(first)[0], slot[first]] = key[first]
        return ids_here, merged, present

    def _topk(self, columns: dict, rows: np.ndarray, windows: list, mask: np.ndarray, k: int | None,
              vocab_limit: int | None) -> dict:
        """The teacher's top-k at each aligned position, merged onto student ids; the rest of its mass, the tail."""
        (top_ids, p_off), (top_lp, _) = (columns[fmt.TOPK_IDS], columns[fmt.TOPK_LOGPROBS])
        cover = columns[fmt.COVERAGE][0]
        B, T1 = mask.shape
        K = k or top_ids.shape[1]
        sids = np.zeros((B, T1, K), np.int64)
        slp = np.full((B, T1, K), -np.inf, np.float32)
        cov = np.zeros((B, T1), np.float32)
        kd_mask = np.zeros((B, T1), bool)
        for i, (r, (_, _, label, _)) in enumerate(zip(rows, windows)):
            s = np.flatnonzero(label >= 0)
            if not s.size:
                continue
            pos = p_off[r] + label[s]                                   # the teacher's positions, flat
            ids_here, (merged,), present = self._merge(top_ids[pos, :K], [np.exp(top_lp[pos, :K].astype(np.float64))],
                                                       vocab_limit)
            sids[i, s] = ids_here
            slp[i, s] = np.where(present, np.log(np.maximum(merged, 1e-300)), -np.inf)
            cov[i, s] = np.minimum(merged.sum(1), cover[pos]).astype(np.float32)
            kd_mask[i, s] = mask[i, s]
        return dict(topk_ids=torch.from_numpy(sids), topk_logprobs=torch.from_numpy(slp),
                    coverage=torch.from_numpy(cov), kd_mask=torch.from_numpy(kd_mask))

    def _sampled(self, columns: dict, rows: np.ndarray, windows: list, mask: np.ndarray, vocab_limit: int | None,
                 proposal_temperature: float) -> dict:
        """The teacher's drawn ids at each aligned position, their empirical
        probabilities summed onto student ids (ids without a student token
        dropped: the estimator then puts no weight where the student has no
        token); with the set's coverage column, the teacher's mass on the kept
        ids for the tail bucket (exact from stored logprobs, else the coverage
        times the kept share of the draws)."""
        from student_train.data import collate
        t = collate(columns, "sampled", rows, None, None, proposal_temperature)   # [B, teacher positions, M]
        t_ids, t_w = t["sampled_ids"].numpy(), t["sampled_weights"].numpy().astype(np.float64)
        t_lp = t["sampled_logprobs"].numpy() if "sampled_logprobs" in t else None
        t_cov = t["sampled_coverage"].numpy() if "sampled_coverage" in t else None
        B, T1 = mask.shape
        M = t_ids.shape[-1]
        sids = np.zeros((B, T1, M), np.int64)
        sw = np.zeros((B, T1, M), np.float32)
        slp = np.full((B, T1, M), -np.inf, np.float32) if t_lp is not None else None
        cov = np.ones((B, T1), np.float32) if t_cov is not None else None
        kd_mask = np.zeros((B, T1), bool)
        for i, (_, _, label, _) in enumerate(windows):
            s = np.flatnonzero(label >= 0)
            if not s.size:
                continue
            tp = label[s]                                               # the teacher's positions in row i
            values = [t_w[i, tp]] + ([np.exp(t_lp[i, tp].astype(np.float64))] if t_lp is not None else [])
            ids_here, merged, present = self._merge(t_ids[i, tp], values, vocab_limit)
            sids[i, s] = ids_here
            sw[i, s] = merged[0]
            if slp is not None:
                slp[i, s] = np.where(present, np.log(np.maximum(merged[1], 1e-300)), -np.inf)
            if cov is not None:
                cov[i, s] = np.minimum(merged[1].sum(1), t_cov[i, tp]) if t_lp is not None \
                    else t_cov[i, tp] * np.minimum(merged[0].sum(1), 1.0)
            kd_mask[i, s] = mask[i, s]
        out = dict(sampled_ids=torch.from_numpy(sids), sampled_weights=torch.from_numpy(sw),
                   kd_mask=torch.from_numpy(kd_mask))
        if slp is not None:
            out["sampled_logprobs"] = torch.from_numpy(slp)
        if cov is not None:
            out["sampled_coverage"] = torch.from_numpy(cov)
        return out
