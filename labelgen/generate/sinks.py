"""The shards of a generation run whose --out is a bucket (s3://, gs://): the
run directory's (rundir.py) commit order for them.

The pipeline works as on local disk, in a staging directory of its own
(RunDir.local: one per output URI and worker); each finished shard is
uploaded by a thread of its own while the teacher goes on, then removed from
the staging directory. Object stores have no rename, so the object is named
for its shard and this attempt (shard-000003-1a2b3c4d.parquet): two attempts
of one worker never write the same object. After each upload the worker's
progress record (progress.worker-0000-of-0001.json, one PUT) lists the shards
it has uploaded with their sizes and hashes; a resumed worker takes those as
done, wherever it runs. The manifest (or the worker's partial manifest)
comes last; manifest.json is created only if absent, and the shard objects
it does not list (left by stopped attempts) are then deleted. A worker whose
lease another host took over (lease.py) commits nothing more.
"""

from __future__ import annotations

import json
import queue
import secrets

from labelgen import format as fmt
from labelgen.format.manifest import check_shard_entry
from labelgen.generate.config import GenerateConfig
from labelgen.generate.pipeline import StageThread, put_to, take
from labelgen.generate.resume import same_slice
from labelgen.shards import ShardInfo
from labelgen.store import storage

QUEUE_DEPTH = 2


def progress_name(worker: int, num_workers: int) -> str:
    return f"progress.worker-{worker:04d}-of-{num_workers:04d}.json"


class BucketShards:
    """The finished shards of one worker of a bucket run (from its progress
    record) and the uploader of those it finishes now."""

    def __init__(self, cfg: GenerateConfig, rd):
        self.cfg, self.rd, self.remote, self.local = cfg, rd, rd.remote, rd.local
        self.attempt = secrets.token_hex(4)
        self.progress = self.remote / progress_name(cfg.worker_index, cfg.num_workers)
        self.record = {} if cfg.overwrite else self._read_record()
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.thread = StageThread(self._upload)

    def _read_record(self) -> dict[int, dict]:
        """Shards an earlier attempt uploaded and recorded, whose objects are
        still there at their recorded size; anything else is redone."""
        try:
            rec = json.loads(storage.read_head(self.progress, 64 << 20))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            return {}   # cut short or not ours: redo this worker's shards
        if not isinstance(rec, dict) or rec.get("config_hash") != self.cfg.output_hash():
            return {}
        found = {}
        for index, entry in (rec.get("shards") or {}).items():
            try:
                check_shard_entry(entry["shard"], str(self.progress))
                obj = self.remote / entry["shard"]["name"]
                if fmt.shard_index(obj.name) == int(index) and obj.stat().st_size == entry["shard"]["bytes"]:
                    found[int(index)] = entry   # one request per shard: stat fails on a missing object
            except (fmt.FormatError, FileNotFoundError, KeyError, TypeError, ValueError):
                continue
        return found

    def done(self, index: int, digest: str) -> bool:
        return index in self.record and same_slice(self.record[index].get("input_sha256"), digest, self.cfg)

    def info(self, index: int) -> tuple[ShardInfo, int]:
        entry = self.record[index]
        return ShardInfo(**entry["shard"]), int(entry.get("skipped", 0))

    def closed(self, index: int, info: ShardInfo, counts: dict) -> None:
        """A shard the writer finished in the staging directory: upload it (in the background)."""
        put_to(self.queue, (index, info, counts), self.thread)

    def _upload(self, stop) -> None:
        while (item := take(self.queue, stop)) is not None:
            index, info, counts = item
            local = self.local / info.name
            name = f"shard-{index:06d}-{self.attempt}{fmt.SHARD_SUFFIX}"
            storage.upload_file(local, self.remote / name)
            self.record[index] = {"shard": {**info.to_dict(), "name": name}, "skipped": counts.get("skipped", 0),
                                  "input_sha256": counts.get("input_sha256")}
            self._save()
            storage.delete(local)

    def _save(self) -> None:
        self.rd.check_held()
        storage.write_bytes(self.progress, json.dumps({"config_hash": self.cfg.output_hash(),
                                                       "attempt": self.attempt, "shards": self.record}).encode())

    def finish(self, written: dict[int, ShardInfo], total: int) -> dict[int, ShardInfo]:
        """Wait for the uploads; every shard of this worker, by index, under
        its object's name. Recorded shards at or past the input's end (`total`
        shards: the input shrank since they were written) leave the record,
        then their objects go, so the set holds what a fresh run writes."""
        put_to(self.queue, None, self.thread)
        self.thread.join_checked()
        stale = {i: self.record.pop(i) for i in sorted(self.record) if i >= total}
        if stale:
            self._save()
            for entry in stale.values():
                storage.delete(self.remote / entry["shard"]["name"])
        return {i: ShardInfo(**e["shard"]) for i, e in self.record.items()}

    def stop(self) -> None:
        self.thread.stop()

    def publish(self, manifest: dict, name: str) -> dict:
        """The run's last writes: the tokenizer (worker 0), then the manifest or
        the worker's partial manifest. manifest.json is created only if absent;
        then the shard objects it does not list are deleted."""
        if self.cfg.worker_index == 0:
            storage.upload_tree(self.local / fmt.TOKENIZER_DIR, self.remote / fmt.TOKENIZER_DIR)
        return self.rd.commit_manifest(manifest, name)
