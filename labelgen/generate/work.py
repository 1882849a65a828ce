"""The generation job's reader: input records -> tokenized, windowed shard
work, cut into shards of `rows_per_shard` records in input order."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.generate.config import GenerateConfig
from labelgen.generate.inputs import FieldSpec, InputError, ReadPosition, Record, read_records
from labelgen.generate.pipeline import offer
from labelgen.shards import ShardReader


def windows(ids: np.ndarray, size: int, stride: int) -> list[tuple[int, np.ndarray]]:
    """(offset, window) pairs covering `ids`; with stride = size - 1 every
    token after the first is predicted exactly once."""
    out, start = [], 0
    while True:
        out.append((start, ids[start:start + size]))
        if start + size >= len(ids):
            return out
        start += stride


@dataclass
class ShardWork:
    index: int
    items: list = field(default_factory=list)   # windows: (example_id, offset, ids, assistant mask or None);
    #                                             samples: (example_id, prompt, ids);
    #                                             score: (example_id, sample_index, ids, prompt length, sampling logprobs)
    examples: int = 0
    skipped: int = 0
    done: bool = False                          # already finished by an earlier run
    input_bytes: int = 0                        # how far the input had been read when the shard was cut
    digest: str = ""                            # sha256 of its input records: what the shard is a function of


def slice_digest(records: list) -> str:
    """sha256 of a shard's input records as read (ids, texts, conversations,
    bad records' errors): a finished shard is kept on resume only if made
    from the same ones, whatever happened to the rest of its file."""
    h = hashlib.sha256()
    for rec in records:
        if isinstance(rec, tuple):   # score mode: (example_id, sample_index, ids, prompt length, logprobs)
            parts = [np.asarray(x).tobytes() if isinstance(x, np.ndarray) else repr(x).encode() for x in rec]
        elif isinstance(rec, InputError):
            parts = [b"bad", str(rec).encode()]
        else:
            parts = [json.dumps([rec.example_id, rec.text, rec.prompt, rec.messages], ensure_ascii=False).encode()]
        for part in parts:
            h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def read_shards(cfg: GenerateConfig, files: list[Path], tokenizer, max_positions: int, finished, work_q: queue.Queue,
                stop: threading.Event):
    """Put this worker's ShardWork on `work_q` in order (those `finished(index,
    digest)` holds as done, without their records), then the number of shards, then None."""
    spec = FieldSpec(cfg.text_field, cfg.prompt_field, cfg.messages_field, cfg.id_field)
    work, records, index = None, [], -1
    position, read_before = ReadPosition(), 0   # input bytes read before the current record
    source = samples_records(cfg, position) if cfg.mode == "score" else read_records(files, spec, position)

    def cut(work: ShardWork, records: list, read: int) -> bool:
        work.input_bytes, work.digest = read, slice_digest(records)
        work.done = finished(work.index, work.digest)
        return offer(work_q, prepare(work, [] if work.done else records, tokenizer, cfg, max_positions), stop)

    for n, rec in enumerate(source):
        if stop.is_set():
            return
        if n % cfg.rows_per_shard == 0:
            if work is not None and not cut(work, records, read_before):
                return
            index, records = n // cfg.rows_per_shard, []
            work = ShardWork(index) if index % cfg.num_workers == cfg.worker_index else None
        if work is not None:
            work.examples += 1
            records.append(rec)
        read_before = position.bytes
    if index < 0:
        raise InputError(f"{', '.join(cfg.inputs)}: no input records (--input); nothing to label")
    if work is not None and not cut(work, records, position.bytes):
        return
    for last in (index + 1, None):   # how many shards exist, then the end
        if not offer(work_q, last, stop):
            return


def prepare(work: ShardWork, records: list, tokenizer, cfg: GenerateConfig, max_positions: int) -> ShardWork:
    """Tokenize a shard's records in one batch call (the fast tokenizer then
    uses all cores) and cut them into teacher items; bad records fail the run
    or, with --skip-bad, are counted."""
    if cfg.mode == "score":
        return prepare_completions(work, records, cfg, max_positions)
    good = [r for r in records if not isinstance(r, InputError)]
    tokenized = tokenize_batch(good, tokenizer, generation_prompt=not cfg.windowed,
                               assistant_mask=bool(cfg.encoding.get("assistant_mask")))
    ids_of = dict(zip(map(id, good), tokenized))
    for rec in records:
        try:
            if isinstance(rec, InputError):
                raise rec
            if isinstance(ids_of[id(rec)], InputError):
                raise ids_of[id(rec)]
            work.items.extend(items_of(rec, ids_of[id(rec)], cfg, max_positions))
        except InputError as e:
            if not cfg.skip_bad:
                raise InputError(f"{e} (pass --skip-bad to skip bad records)") from None
            work.skipped += 1
    return work


def tokenize_batch(records: list[Record], tokenizer, generation_prompt: bool,
                   assistant_mask: bool = False) -> list[tuple[str, list[int], np.ndarray | None] | InputError]:
    """(text the teacher sees, its ids, which ids are the assistant's) per
    record, or the record's InputError. Chat messages are rendered with the
    tokenizer's template (which brings its own special tokens), with the
    assistant's generation prompt appended when the teacher is to answer
    (sampling modes) and as they stand when the conversation is scored;
    with `assistant_mask` a scored conversation's assistant turns are found
    (chat_turns) and mapped to its tokens by their character offsets."""
    texts, plain, spans = [], [], []
    for rec in records:
        if rec.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise InputError(f"{rec.where}: --messages-field needs a chat template and the teacher's tokenizer has none")
            try:
                text, turns = chat_turns(tokenizer, rec) if assistant_mask else \
                    (tokenizer.apply_chat_template(rec.messages, tokenize=False, add_generation_prompt=generation_prompt), None)
            except InputError as e:
                text, turns = e, None
            texts.append(text)
            spans.append(turns)
        else:
            texts.append(rec.text if rec.text is not None else rec.prompt)
            spans.append(None)
        plain.append(rec.messages is None)
    rendered = [t for t in texts if not isinstance(t, InputError)]
    if not rendered:
        return texts
    chat = [t for t, p in zip(texts, plain) if not p and not isinstance(t, InputError)]
    with_specials = iter(tokenizer([t for t, p in zip(texts, plain) if p])["input_ids"] if any(plain) else [])
    without = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=assistant_mask) if chat else {}
    without_ids, offsets = iter(without.get("input_ids", [])), iter(without.get("offset_mapping", []))
    out = []
    for text, p, turns in zip(texts, plain, spans):
        if isinstance(text, InputError):
            out.append(text)
            continue
        ids = next(with_specials) if p else next(without_ids)
        mask = None
        if assistant_mask and not p:
            at = np.asarray(next(offsets), np.int64).reshape(-1, 2)
            start, end = at[:, 0], np.maximum(at[:, 1], at[:, 0] + 1)   # a token without characters: its start
            mask = np.zeros(len(ids), bool)
            for a, b in turns:   # a token counts when its characters overlap an assistant turn
                mask |= (start < b) & (end > a)
        out.append((text, ids, mask))
    return out


def chat_turns(tokenizer, rec: Record) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as the chat template renders it, and the character
    spans of its assistant turns: each from the end of the generation prompt
    before it (the conversation so far rendered with add_generation_prompt)
    to the end of the conversation rendered through it, so a turn is what
    the model would write when asked: its content and end-of-turn tokens.
    A template that renders a conversation's start other than as the start
    of the whole (one that rewrites earlier turns) is an InputError."""
    def render(messages: list, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    text, spans = render(rec.messages, False), []
    off = "; pass --encoding assistant_mask=false to label without marking the assistant's tokens"
    for i, message in enumerate(rec.messages):
        if message.get("role") != "assistant":
            continue
        try:
            through = render(rec.messages[:i + 1], False)
            before = render(rec.messages[:i], True) if i else _opening_prompt(through, render)
        except Exception as e:  # a template may refuse a conversation's start (e.g. one that must open with a user turn)
            raise InputError(f"{rec.where}: the chat template cannot render the conversation before message {i} "
                             f"({fmt.one_line(e)}), so its assistant turn cannot be told apart{off}") from None
        if not (through.startswith(before) and text.startswith(through)):
            raise InputError(f"{rec.where}: the chat template renders the conversation through message {i} otherwise "
                             f"than as the start of the whole (it rewrites earlier turns), so the assistant's tokens "
                             f"cannot be told apart{off}")
        spans.append((len(before), len(through)))
    return text, spans


def _opening_prompt(through: str, render) -> str:
    """What precedes a conversation's opening assistant turn (a system preamble the template adds, and the
    assistant's generation prompt): a conversation so far cannot be rendered with no message, so the generation
    prompt is learnt from a one-message user turn (what add_generation_prompt adds to it) and found in `through`."""
    probe = [{"role": "user", "content": "x"}]
    prompt = render(probe, True)[len(render(probe, False)):]
    at = through.find(prompt) if prompt else -1
    if at < 0:
        raise ValueError("the generation prompt does not open the assistant's turn")
    return through[:at + len(prompt)]


def items_of(rec: Record, tokenized: tuple[str, list[int], np.ndarray | None], cfg: GenerateConfig,
             max_positions: int) -> list[tuple]:
    text, ids, mask = tokenized
    if cfg.windowed:
        if len(ids) < 2:
            raise InputError(f"{rec.where}: text has {len(ids)} token(s); at least 2 are needed to predict one")
        arr = np.asarray(ids, dtype=np.int64)
        return [(rec.example_id, off, w, None if mask is None else mask[off:off + len(w)])
                for off, w in windows(arr, cfg.max_seq_len, cfg.window_stride)]
    if len(ids) + cfg.max_new_tokens > max_positions:
        raise InputError(f"{rec.where}: prompt has {len(ids)} tokens; with --max-new-tokens {cfg.max_new_tokens} "
                         f"that exceeds the teacher's {max_positions} positions")
    return [(rec.example_id, text, list(ids))]


# ---------------------------------------------------------------- score mode: a samples label set as input


def samples_input(cfg: GenerateConfig, tokenizer):
    """The samples label set `--mode score` reads, checked: its kind, and
    the tokenizer its completions were written in (the teacher's)."""
    reader = ShardReader(cfg.inputs[0])
    if reader.kind != "samples":
        raise InputError(f"{cfg.inputs[0]}: holds {reader.kind} labels; --mode score scores a samples label set "
                         "(completions from `labelgen generate --mode sample`)")
    theirs = (reader.manifest.get("tokenizer") or {}).get("fingerprint")
    ours = fmt.tokenizer_fingerprint(tokenizer)
    if theirs != ours["fingerprint"]:
        raise InputError(f"{cfg.inputs[0]}: its completions were written with another tokenizer than the teacher's "
                         f"(differs in: {fmt.tokenizer_difference(reader.manifest.get('tokenizer') or {}, ours)}); "
                         "the teacher can only score ids of its own vocabulary")
    reader.check_files()
    return reader


def samples_records(cfg: GenerateConfig, position: ReadPosition):
    """The rows of the samples label set as score items (see ShardWork.items);
    `position` counts the bytes of the shards read so far."""
    reader = ShardReader(cfg.inputs[0])
    columns = [fmt.EXAMPLE_ID, fmt.SAMPLE_INDEX, fmt.PROMPT_IDS, fmt.COMPLETION_IDS, fmt.COMPLETION_LOGPROBS]
    for si, shard in enumerate(reader.shards):
        pf = reader.open_shard(shard)
        for rg in range(pf.num_row_groups):
            for row in fmt.rows_from_decoded(reader.read_row_group(si, rg, columns, pf)):
                prompt, completion = row[fmt.PROMPT_IDS], row[fmt.COMPLETION_IDS]
                yield (row[fmt.EXAMPLE_ID], int(row[fmt.SAMPLE_INDEX]), np.concatenate([prompt, completion]),
                       len(prompt), row[fmt.COMPLETION_LOGPROBS])
        position.bytes += int(shard["bytes"])


def prepare_completions(work: ShardWork, records: list, cfg: GenerateConfig, max_positions: int) -> ShardWork:
    """Score items of a shard: a completion must have a token to score, and
    prompt + completion must fit the teacher."""
    for item in records:
        ex, j, ids, prompt_length, _ = item
        try:
            if prompt_length < 1 or len(ids) <= prompt_length:
                raise InputError(f"{cfg.inputs[0]}: example {ex!r} sample {j}: "
                                 f"{'the prompt is' if prompt_length < 1 else 'the completion is'} empty; nothing to score")
            if len(ids) > max_positions:
                raise InputError(f"{cfg.inputs[0]}: example {ex!r} sample {j}: prompt + completion hold {len(ids)} "
                                 f"tokens, more than the teacher's {max_positions} positions")
            work.items.append(item)
        except InputError as e:
            if not cfg.skip_bad:
                raise InputError(f"{e} (pass --skip-bad to skip bad records)") from None
            work.skipped += 1
    return work
