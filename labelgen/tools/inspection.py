"""Looking at label sets: `validate` (is it intact and well-formed?), `inspect`
(what does it cost and how much of the teacher does it keep?) and `estimate`
(what would a corpus cost?). Run through the CLI: `labelgen validate DIR`,
`labelgen inspect DIR`, `labelgen estimate --tokens N --vocab V --k K`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.format import FormatError
from labelgen.shards import ShardReader
from labelgen.store import storage

# Coverage percentiles come from a fixed histogram, so memory stays bounded
# however many positions a label set has; the bin width bounds their error.
COVERAGE_BINS = 10_000


# ---------------------------------------------------------------- validate


def validate(label_dir: Path | str, max_problems: int = 20) -> dict:
    """Check a label set. Returns {"ok", "problems": [{"file", "row", "problem"}], ...}."""
    label_dir = storage.location(label_dir)
    problems: list[dict] = []

    def add(file, row, problem):
        if len(problems) < max_problems:
            problems.append({"file": str(file), "row": row, "problem": problem})

    try:
        reader = ShardReader(label_dir)
    except FormatError as e:
        where = str(label_dir / fmt.MANIFEST_NAME)
        add(where, None, str(e).removeprefix(f"{where}: "))
        return {"ok": False, "problems": problems, "shards": 0, "rows": 0}

    table = reader.manifest.get("shard_table")
    listed = set(reader.shards.names) | ({table["name"]} if table else set())
    for extra in [p.name for p in storage.list_dir(label_dir, "*" + fmt.SHARD_SUFFIX) if p.name not in listed]:
        add(label_dir / extra, None, "shard file not listed in the manifest")
    if table and storage.sha256_file(label_dir / table["name"]) != table["sha256"]:
        add(label_dir / table["name"], None, "sha256 does not match the manifest (corrupted)")
    rows_checked = 0
    for si, shard in enumerate(reader.shards):
        path = label_dir / shard["name"]
        try:
            pf = reader.open_shard(shard)
        except FormatError as e:
            add(path, None, str(e).removeprefix(f"{path}: "))
            continue
        if storage.sha256_file(path) != shard["sha256"]:
            add(path, None, "sha256 does not match the manifest (corrupted)")
            continue
        expected = fmt.schema(reader.kind, reader.vocab_size, reader.encoding)
        if not pf.schema.to_arrow_schema().remove_metadata().equals(expected):   # as written, strings undecoded
            add(path, None, "schema differs from the format's schema for this kind and vocabulary")
            continue
        groups = shard.get("row_groups")
        if groups is not None and groups >= 0 and groups != pf.num_row_groups:   # the loader plans with these
            add(path, None, f"the manifest says {groups} row groups, the file has {pf.num_row_groups}")
            continue
        row0 = 0
        for rg in range(pf.num_row_groups):
            try:
                d = reader.read_row_group(si, rg, pf=pf)
            except FormatError as e:
                add(path, row0, str(e))
                break
            n = pf.metadata.row_group(rg).num_rows
            for i, problem in _check_rows(d, reader):
                add(path, row0 + i, problem)
            row0 += n
        else:
            if (held := _positions_in(pf, reader.kind)) != shard["positions"]:
                add(path, None, f"the manifest says {shard['positions']} positions, the file holds {held}")
        rows_checked += row0
    return {"ok": not problems, "problems": problems, "shards": len(reader.shards), "rows": rows_checked}


def _positions_in(pf, kind: str) -> int:
    """The positions a shard holds, from its position column alone (read after its row groups passed the checks
    that bound what a reader allocates)."""
    rk = fmt.record_kind(kind)
    return sum(rk.positions(pf.read_row_group(i, columns=[rk.position_column])) for i in range(pf.num_row_groups))


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def _check_rows(d: dict, reader: ShardReader):
    """Yield (row in row group, problem) for decoded columns `d`."""
    V = reader.vocab_size
    id_cols = [c for c in (fmt.INPUT_IDS, fmt.TOPK_IDS, fmt.PROMPT_IDS, fmt.COMPLETION_IDS) if c in d]
    for col in id_cols:
        values, off = d[col]
        bad = np.flatnonzero(values.reshape(len(values), -1).max(axis=1) >= V) if values.size else []
        if len(bad):
            yield _row_of(off, bad[0]), f"{col} has an id >= vocab_size {V}"
    if reader.kind == "sampled":
        yield from _check_sampled(d, reader)
    if reader.kind not in fmt.TOPK_KINDS:
        return
    lp, off = d[fmt.TOPK_LOGPROBS]
    cov, _ = d[fmt.COVERAGE]
    ids_off = d[fmt.INPUT_IDS][1]
    if reader.kind == "topk" and not np.array_equal(np.diff(ids_off) - 1, np.diff(off)):
        yield 0, "per-position columns do not have len(input_ids) - 1 entries"
        return
    with np.errstate(invalid="ignore"):   # -inf - -inf between empty slots (adaptive truncation)
        unsorted = np.diff(lp, axis=1) > 1e-6 if lp.shape[1] > 1 else np.zeros_like(lp, bool)
    ids = d[fmt.TOPK_IDS][0] if fmt.TOPK_IDS in d else None
    if ids is not None and ids.shape[1] > 1:   # dropped slots (adaptive truncation) get distinct stand-ins
        kept = np.where(np.isfinite(lp), ids, -1 - np.arange(ids.shape[1]))
        repeated = np.diff(np.sort(kept, axis=1), axis=1) == 0
    else:
        repeated = np.zeros_like(lp, bool)
    checks = [
        (repeated, "a token id appears twice among one position's entries"),
        (lp > 0, "positive logprob"),
        (unsorted, "top-k logprobs not sorted descending"),
        ((cov < 0) | (cov > 1) | np.isnan(cov), "coverage outside [0, 1]"),
    ]
    enc = reader.encoding
    mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    # entries stored per position: the error bounds add up over these
    n = d[fmt.TOPK_LENGTHS][0].astype(np.float64) if fmt.TOPK_LENGTHS in d else float(reader.k)
    # The stored coverage's own error (2.0): |sqrt(tail) error| <= t/2, so |tail error| <= t*sqrt(tail) + t^2/4.
    t = fmt.TAIL_SQRT_STEP if enc.position_codec == "quantized" else 0.0
    cov_slack = t * np.sqrt(np.clip(1 - cov.astype(np.float64), 0, 1)) + t * t / 4
    if enc.logprob_codec == "sqrt":
        # |sqrt(q) - sqrt(p)| <= s/2 per entry, so |q - p| <= s*sqrt(p) + s^2/4; summed with Cauchy-Schwarz
        s = enc.sqrt_step
        slack = 1e-5 + s * np.sqrt(n * cov.astype(np.float64)) + n * s * s / 4 + cov_slack
        inconsistent = np.abs(mass - cov) > slack
        unit = f"{s / 2:.3g} in sqrt(p)"
    else:
        err = enc.max_logprob_error
        floor = enc.u8_range if enc.logprob_codec == "u8" else -fmt.LOGPROB_FLOOR
        slack = 1e-5 + n * math.exp(-floor) + cov_slack
        inconsistent = (mass > cov * math.exp(err) + slack) | (mass < cov * math.exp(-err) - slack)
        unit = f"{err:.3g} nats"
    checks.append((inconsistent, f"coverage differs from the sum of exp(top-k logprobs) by more than the codec's error ({unit})"))
    for mask, problem in checks:
        bad = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
        if len(bad):
            yield _row_of(off, bad[0]), problem


def _check_sampled(d: dict, reader: ShardReader):
    """A sampled set's coverage (the teacher's mass on each position's drawn
    ids, 2.2) against the drawn ids' stored logprobs, where it has both: the
    same mass, within the two codecs' errors."""
    if fmt.COVERAGE not in d or fmt.SAMPLED_LOGPROBS not in d:
        return
    (lp, _), (lengths, off) = d[fmt.SAMPLED_LOGPROBS], d[fmt.SAMPLED_LENGTHS]
    cov = d[fmt.COVERAGE][0].astype(np.float64)
    if lp.size != int(lengths.sum()) or not len(lengths):
        return   # drawn without their logprobs: nothing to compare
    if ((cov < 0) | (cov > 1) | np.isnan(cov)).any():
        yield _row_of(off, int(np.flatnonzero((cov < 0) | (cov > 1) | np.isnan(cov))[0])), "coverage outside [0, 1]"
        return
    enc = reader.encoding
    mass = np.add.reduceat(np.exp(lp.astype(np.float64)), np.cumsum(lengths) - lengths)
    err = enc.u8_range / 510   # the drawn ids' logprobs: u8 codes down to -u8_range
    t = fmt.TAIL_SQRT_STEP if enc.position_codec == "quantized" else 0.0
    slack = 1e-5 + lengths * math.exp(-enc.u8_range) + t * np.sqrt(np.clip(1 - cov, 0, 1)) + t * t / 4
    bad = np.flatnonzero((mass > cov * math.exp(err) + slack) | (mass < cov * math.exp(-err) - slack))
    if len(bad):
        yield _row_of(off, int(bad[0])), (f"coverage differs from the sum of exp(drawn ids' logprobs) by more than the "
                                          f"codecs' error ({err:.3g} nats)")


# ---------------------------------------------------------------- inspect


def _percentile_from_hist(hist: np.ndarray, q: float) -> float:
    total = hist.sum()
    if total == 0:
        return float("nan")
    idx = int(np.searchsorted(np.cumsum(hist), q / 100 * total, side="left"))
    return (idx + 0.5) / len(hist)


def inspect(label_dir: Path | str) -> dict:
    """Sizes, compression and (for topk) coverage statistics of a label set."""
    reader = ShardReader(label_dir)
    kind, k, V = reader.kind, reader.k, reader.vocab_size
    topk = kind in fmt.TOPK_KINDS
    variable_k = topk and reader.encoding.variable_k
    shards, hist = [], np.zeros(COVERAGE_BINS, dtype=np.int64)
    cov_sum, in_topk, finish = 0.0, 0, {}
    sampler_lp, teacher_lp, rounds = 0.0, 0.0, set()   # scored: the sampler's and the teacher's logprobs
    unique_sum, unique_hist = 0, np.zeros(256, dtype=np.int64)
    chat = kind in fmt.WINDOW_KINDS and reader.encoding.assistant_mask
    assistant = 0   # chat windows: positions whose target is the assistant's (what --assistant-only counts)
    by_column: dict[str, int] = {}
    for si, shard in enumerate(reader.shards):
        pf = reader.open_shard(shard)
        for rg in range(pf.num_row_groups):
            md = pf.metadata.row_group(rg)
            for j in range(md.num_columns):
                name = md.column(j).path_in_schema.split(".")[0]
                by_column[name] = by_column.get(name, 0) + md.column(j).total_compressed_size
        topk_cols = [fmt.COVERAGE, fmt.TARGET_RANK] + ([fmt.TOPK_LENGTHS] if variable_k else [])
        cols = {"topk": topk_cols, "samples": [fmt.FINISH_REASON], "tokens": [], "sampled": [fmt.SAMPLED_LENGTHS],
                "scored": topk_cols + [fmt.TARGET_LOGPROB, fmt.SAMPLING_LOGPROB, fmt.ROUND]}[kind] \
            + ([fmt.ASSISTANT_MASK] if chat else [])
        # stored entries (counted below under variable_k); positions for the other kinds
        entries = 0 if variable_k else shard["positions"] * (k if topk else 1)
        shard_in = in_topk
        for rg in range(pf.num_row_groups if cols else 0):
            d = reader.read_row_group(si, rg, cols, pf)
            if chat:   # position t predicts input id t + 1: a row's first mark is no position's target
                marks, offsets = d[fmt.ASSISTANT_MASK]
                assistant += int(marks.sum()) - int(marks[offsets[:-1]].sum())
            if kind == "scored":
                sampler_lp += float(d[fmt.SAMPLING_LOGPROB][0].astype(np.float64).sum())
                teacher_lp += float(d[fmt.TARGET_LOGPROB][0].astype(np.float64).sum())
                rounds.update(int(x) for x in np.unique(d[fmt.ROUND]))
            if topk:
                kept = k
                if variable_k:
                    kept = d[fmt.TOPK_LENGTHS][0]
                    entries += int(kept.sum())
                cov = d[fmt.COVERAGE][0].astype(np.float64)
                cov_sum += cov.sum()
                hist += np.bincount(np.clip((cov * COVERAGE_BINS).astype(np.int64), 0, COVERAGE_BINS - 1),
                                    minlength=COVERAGE_BINS)
                in_topk += int((d[fmt.TARGET_RANK][0] < kept).sum())
            elif kind == "sampled":
                lengths = d[fmt.SAMPLED_LENGTHS][0]
                unique_sum += int(lengths.sum())
                unique_hist += np.bincount(lengths, minlength=256)[:256]
            elif kind == "samples":
                for r in d[fmt.FINISH_REASON]:
                    finish[r] = finish.get(r, 0) + 1
        shards.append(_sizes(shard, entries, V))
        if topk:   # the share of this shard's positions whose actual next token is among its stored entries
            shards[-1]["target_in_topk"] = (in_topk - shard_in) / max(shard["positions"], 1)
    total = _sizes({"name": "total", "rows": sum(s["rows"] for s in shards),
                    "positions": sum(s["positions"] for s in shards),
                    "bytes": sum(s["bytes"] for s in shards)}, sum(s["entries"] for s in shards), V)
    # What each column takes, compressed; the rest of the files is their footers (schema, id table, indexes).
    by_column = dict(sorted(by_column.items(), key=lambda x: -x[1]))
    by_column["footers"] = total["bytes"] - sum(by_column.values())
    out = {"dir": str(label_dir), "kind": kind, "k": k, "vocab_size": V, "encoding": reader.encoding.to_dict(),
           **{key: total[key] for key in total if key != "name"}, "shards": shards, "bytes_by_column": by_column}
    if topk:
        n = max(total["positions"], 1)
        out.update({
            "entries_per_position": total["entries"] / n,
            "coverage_mean": cov_sum / n,
            "coverage_p1": _percentile_from_hist(hist, 1),
            "coverage_p5": _percentile_from_hist(hist, 5),
            "coverage_p50": _percentile_from_hist(hist, 50),
            "coverage_below_0.9": float(hist[: int(0.9 * COVERAGE_BINS)].sum() / n),
            "coverage_below_0.99": float(hist[: int(0.99 * COVERAGE_BINS)].sum() / n),
            "target_in_topk": in_topk / n,
            "coverage_histogram": hist.reshape(20, -1).sum(axis=1).tolist(),
        })
    elif kind == "sampled":
        n = max(total["positions"], 1)
        cum = np.cumsum(unique_hist)
        out.update({"draws": k, "unique_per_position": unique_sum / n,
                    "unique_p50": int(np.searchsorted(cum, 0.5 * n)), "unique_p95": int(np.searchsorted(cum, 0.95 * n)),
                    "bytes_per_unique_id": total["bytes"] / max(unique_sum, 1)})
    elif kind == "samples":
        out["finish_reasons"] = finish
    if chat:
        out["assistant_positions"] = assistant
    if kind == "scored":
        n = max(total["positions"], 1)
        # E_y~sampler[log p_sampler(y) - log p_teacher(y)]: the sampler's reverse KL to the teacher, per token
        out.update({"rounds": sorted(rounds), "sampler_logprob_mean": sampler_lp / n,
                    "teacher_logprob_mean": teacher_lp / n, "reverse_kl": (sampler_lp - teacher_lp) / n})
    return out


def _sizes(s: dict, entries: int, V: int) -> dict:
    """Size figures of a shard (or the total) storing `entries` top-k entries (positions otherwise)."""
    pos, b = s["positions"], s["bytes"]
    raw_topk = entries * 8  # int32 id + float32 logprob per entry
    return {
        "name": s["name"], "rows": s["rows"], "positions": pos, "bytes": b, "entries": entries,
        "bytes_per_position": b / pos if pos else float("nan"),
        "bytes_per_entry": b / entries if entries else float("nan"),
        "ratio_vs_raw_topk": raw_topk / b if b else float("nan"),
        "ratio_vs_full_fp8": pos * V / b if b else float("nan"),
        "ratio_vs_full_bf16": pos * V * 2 / b if b else float("nan"),
    }


def format_inspect(r: dict) -> str:
    lines = [f"{r['dir']}: {r['kind']} labels, k={r['k']}, vocab {r['vocab_size']}, "
             f"logprobs {r['encoding']['logprob_codec']}, zstd {r['encoding']['zstd_level']}"]
    if r["kind"] in fmt.TOPK_KINDS:
        lines.append(f"{'shard':<24}{'rows':>10}{'positions':>12}{'bytes':>14}{'B/pos':>9}{'B/entry':>9}{'vs raw':>8}{'vs bf16':>10}")
        for s in r["shards"] + [dict(r, name="total")]:
            lines.append(f"{s['name']:<24}{s['rows']:>10,}{s['positions']:>12,}{s['bytes']:>14,}"
                         f"{s['bytes_per_position']:>9.2f}{s['bytes_per_entry']:>9.3f}"
                         f"{s['ratio_vs_raw_topk']:>7.1f}x{s['ratio_vs_full_bf16']:>9.0f}x")
    else:
        unit = "tokens" if r["kind"] == "samples" else "positions"
        lines.append(f"{'shard':<24}{'rows':>10}{unit:>12}{'bytes':>14}{'B/' + unit[:-1]:>11}")
        for s in r["shards"] + [dict(r, name="total")]:
            lines.append(f"{s['name']:<24}{s['rows']:>10,}{s['positions']:>12,}{s['bytes']:>14,}{s['bytes_per_position']:>11.2f}")
    unit = "token" if r["kind"] == "samples" else "position"
    lines.append(f"B/{unit} by column: " + ", ".join(f"{c} {b / max(r['positions'], 1):.2f}"
                                                     for c, b in r["bytes_by_column"].items()))
    if "assistant_positions" in r:
        lines.append(f"assistant's tokens (what --assistant-only counts): {r['assistant_positions']:,} positions, "
                     f"{r['assistant_positions'] / max(r['positions'], 1):.1%}")
    if r["kind"] == "scored":
        lines.append(f"completions of round(s) {', '.join(map(str, r['rounds']))}: teacher logprob "
                     f"{r['teacher_logprob_mean']:.3f}, sampler logprob {r['sampler_logprob_mean']:.3f} nats per token; "
                     f"the sampler's reverse KL to the teacher {r['reverse_kl']:.3f} nats per token")
    if r["kind"] in fmt.TOPK_KINDS:
        lines.append(f"coverage: mean {r['coverage_mean']:.4f}  p1 {r['coverage_p1']:.4f}  p5 {r['coverage_p5']:.4f}  "
                     f"p50 {r['coverage_p50']:.4f}  below 0.9: {r['coverage_below_0.9']:.1%}  "
                     f"below 0.99: {r['coverage_below_0.99']:.1%}")
        lines.append(f"actual next token inside the stored top-{r['k']}: {r['target_in_topk']:.1%}")
        if r["encoding"].get("variable_k"):
            lines.append(f"adaptive truncation: {r['entries_per_position']:.1f} entries per position stored (cap k={r['k']}); "
                         f"coverage is the mass of the stored entries")
        h = np.asarray(r["coverage_histogram"], dtype=float)
        for i, c in enumerate(h):
            bar = "#" * int(round(40 * c / h.max())) if h.max() else ""
            lines.append(f"  [{i / 20:.2f}, {(i + 1) / 20:.2f}) {int(c):>10,} {bar}")
    elif r["kind"] == "sampled":
        lines.append(f"{r['draws']} draws per position: {r['unique_per_position']:.1f} distinct ids per position "
                     f"(p50 {r['unique_p50']}, p95 {r['unique_p95']}), {r['bytes_per_unique_id']:.2f} B per distinct id")
    elif r["kind"] == "samples":
        lines.append("finish reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(r["finish_reasons"].items())))
    return "\n".join(lines)


def plot_inspect(r: dict, path: Path | str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FormatError("--plot needs matplotlib: pip install -e '.[plot]' in the labelgen checkout") from None
    if r["kind"] not in fmt.TOPK_KINDS:
        raise FormatError("--plot draws the top-k coverage histogram; this label set holds samples")
    h = np.asarray(r["coverage_histogram"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(20) / 20, h / max(h.sum(), 1), width=0.05, align="edge")
    ax.set_xlabel(f"teacher probability mass inside the top-{r['k']}")
    ax.set_ylabel("share of positions")
    ax.set_title(f"coverage (mean {r['coverage_mean']:.3f}, {r['bytes_per_position']:.1f} B/position)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- estimate


def estimate(tokens: float, vocab: int | None = None, k: int | None = None,
             from_dir: Path | str | None = None) -> dict:
    """Storage of a label set for `tokens` tokens: per position as measured on
    the label set `from_dir` (top-k, adaptive top-k or sampled), scaled to
    another k or vocabulary with a warning saying how; without one, the
    format's uncompressed top-k layout (an upper bound). Full-vocabulary
    storage beside it, for comparison."""
    if tokens <= 0 or (vocab is not None and vocab <= 0) or (k is not None and k <= 0):
        raise OptionError("--tokens, --vocab and --k must be positive")
    warnings: list[str] = []
    if from_dir is not None:
        m = inspect(from_dir)
        if m["kind"] not in (*fmt.TOPK_KINDS, "sampled"):
            raise OptionError(f"{from_dir}: holds {m['kind']} labels; estimate measures top-k and sampled sets")
        vocab = vocab or m["vocab_size"]
        per_position = m["bytes_per_position"]
        if m["kind"] == "sampled":
            k = k or m["draws"]
            entries = m["unique_per_position"]   # one id and one count per distinct drawn id
            if k != m["draws"]:
                raise OptionError(f"--k {k}: {from_dir} holds {m['draws']} draws per position; the distinct ids of "
                                  "another N are not known from it: measure a set made with --draws N")
            what = f"{m['draws']} draws, {entries:.1f} distinct ids/position"
        else:
            k = k or m["k"]
            entries = m["entries_per_position"]
            what = f"k={m['k']}, {entries:.1f} entries/position"
            if k != m["k"]:
                if k > m["k"]:
                    raise OptionError(f"--k {k}: {from_dir} holds top-{m['k']}; a larger k cannot be read from it")
                warnings.append(f"measured at k={m['k']}: k={k} scaled by bytes per entry, which grow as k shrinks "
                                f"(fewer, larger logprob gaps): measure a set made with --k {k}")
                per_position *= k / m["k"]
                entries *= k / m["k"]
        if vocab != m["vocab_size"]:
            # An id spread over V' values carries log2(V'/V) more bits than over V; the stored width (uint16 or
            # uint32) is not what it costs: byte-stream-split + zstd keep little of a mostly-constant high half.
            bits = math.log2(vocab / m["vocab_size"])
            warnings.append(f"measured at V={m['vocab_size']:,}: ids of V={vocab:,} estimated at {bits:+.2f} bits "
                            "each (ids spread as these are); measure a small set of the target teacher")
            per_position += bits / 8 * entries
        source = f"measured from {from_dir} ({what})"
    else:
        if vocab is None:
            raise OptionError("--vocab: required without a label set to measure")
        k = k or 64
        if k > vocab:
            raise OptionError(f"--k {k} is larger than --vocab {vocab}")
        # Uncompressed size of this format's layout: id + uint16 gap per entry,
        # coverage, target logprob and rank (3 x 4 bytes) per position.
        per_position = k * (fmt.id_dtype(vocab).itemsize + 2) + 12
        source = ("the uncompressed top-k layout: an upper bound, about 3-4x what zstd stores; pass a label set "
                  "made with these settings for a measured figure")
    rows = {"labels": tokens * per_position, "full_fp32": tokens * vocab * 4, "full_bf16": tokens * vocab * 2,
            "full_fp8": tokens * vocab * 1}
    return {"tokens": tokens, "vocab": vocab, "k": k, "bytes_per_position": per_position, "source": source,
            "warnings": warnings, "bytes": rows, "labels_vs_full_fp8": rows["full_fp8"] / rows["labels"]}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_estimate(e: dict, full: bool = False) -> str:
    """The estimate as lines; the full-vocabulary rows with `full`."""
    b = e["bytes"]["labels"]
    lines = [f"{e['tokens']:.3g} tokens at {e['bytes_per_position']:.2f} B/position: {human_bytes(b)} "
             f"({b:.3e} B); {e['source']}"]
    lines += [f"  warning: {w}" for w in e["warnings"]]
    if full:
        for name, label in (("full_fp32", "fp32"), ("full_bf16", "bf16"), ("full_fp8", "fp8")):
            lines.append(f"  full vocabulary ({e['vocab']:,}), {label}: {human_bytes(e['bytes'][name])} "
                         f"({e['bytes'][name] / 1e9:,.0f} GB)")
    else:
        lines.append(f"  {e['labels_vs_full_fp8']:,.0f}x smaller than full-vocabulary labels at 1 B per probability "
                     "(--full for the full-vocabulary rows)")
    return "\n".join(lines)
