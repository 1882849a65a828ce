"""The generation pipeline: a teacher over a corpus or prompt set -> label
shards (`labelgen generate`).

    from labelgen.generate import GenerateConfig, run
    run(GenerateConfig(teacher="teacher/", inputs=("corpus/",), out="labels/", k=64))

Its modules, in the order data flows: `config` (GenerateConfig), `inputs`
(input files -> records), `work` (records -> each shard's tokenized teacher
items), `requests` (what the teacher is asked per mode), `pipeline` (the
stage threads), `job` (the run: reader, teacher and writer stages),
`resume` (which run an output holds, which shards are finished), `sinks`
(where finished shards are committed: a directory or a bucket; the
manifest last), `finalize` (data-parallel workers' manifests merged),
`ray_units` (--ray) and `mfu` (FLOPs and MFU).
"""

from labelgen.generate.config import GenerateConfig
from labelgen.generate.job import run

__all__ = ["GenerateConfig", "run"]
