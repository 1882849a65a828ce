"""The label shard format: the one place that defines what a label shard is.

Every reader and writer imports this package (`from labelgen import format
as fmt`); nobody re-declares a column name. Its modules: `schema` (names,
record kinds, the Encoding, shard metadata), `kinds` (the record-kind table:
columns, Parquet options, position counting, loader columns, encoder),
`codec` (logprob codecs, id map, encoders, decode_batch) and `manifest`.
A label set is a directory of zstd-compressed Parquet shards plus a
``manifest.json`` written last (see docs/format.md). Five record kinds:

``topk``     one row per token window: the input ids and, for each of the
             L-1 next-token predictions, the teacher's top-k (id, logprob)
             sorted by logprob descending, the mass they cover, and the
             logprob and rank of the token that actually came next. With
             adaptive truncation (``Encoding.variable_k``, 1.3) a position
             keeps 1..k entries and ``topk_lengths`` says how many.
``samples``  one row per teacher completion of a prompt (hard labels).
``tokens``   one row per token window, ids only (a tokenized corpus, for
             co-distillation and CE baselines; added in format 1.1).
``sampled``  one row per token window: at each of its L-1 positions, the
             distinct ids among N draws from the teacher's distribution and
             how often each was drawn (sparse unbiased soft labels; 1.1).
``scored``   one row per sampled completion (prompt then completion in
             input_ids) scored by the teacher at its completion tokens only:
             the topk per-position columns for those P tokens, plus the
             sampler's logprob of each (sampling_logprob) and the on-policy
             round it came from (2.1).

Encoding (chosen by benchmarks/bench_storage.py on a real LLM's labels,
documented in docs/format.md): ids use the narrowest unsigned width the
vocabulary allows. By default each position's top-k is stored in id order —
ids as ascending deltas, probabilities quantised beside them — because a
teacher's candidate sets cluster on frequent tokens and sorted deltas compress
far better than ids in rank order. Before sorting, ids are renumbered by how
often the shard's first row group proposes them (format 1.2; the table is in
the shard's footer), so the frequent candidates get small numbers and small
deltas. Probabilities are stored as uint8 codes of sqrt(p) (1.2): an entry's
KL cost of an error grows with its probability, and a uniform step in sqrt(p)
spends the same KL on every entry. The alternative layout keeps rank order and
gap-codes the sorted logprobs. The per-position coverage and target logprob
are quantised too (2.0): coverage as a uint8 code of sqrt(1 - coverage),
the target logprob as uint16 in 1/64 nat. Decoding always returns rank order
(logprob descending), int64 ids and float32 logprobs, coverage and target
logprobs.
"""

from labelgen.format.schema import *  # noqa: F401,F403
from labelgen.format.codec import *  # noqa: F401,F403
from labelgen.format.kinds import *  # noqa: F401,F403
from labelgen.format.manifest import *  # noqa: F401,F403
