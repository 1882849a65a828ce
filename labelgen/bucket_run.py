"""A generation run whose --out is a bucket (s3://, gs://).

The pipeline works as on local disk, in a staging directory of its own
(storage.staging_dir: one per output URI and worker); each finished shard is
uploaded by a thread of its own while the teacher goes on, then removed from
the staging directory. Object stores have no rename, so the object is named
for its shard and this attempt (shard-000003-1a2b3c4d.parquet): two attempts
of one worker never write the same object. After each upload the worker's
progress record (progress.worker-0000-of-0001.json, one PUT) lists the shards
it has uploaded with their sizes and hashes; a resumed worker takes those as
done, wherever it runs. The manifest (or the worker's partial manifest)
comes last; manifest.json is created only if absent, and the shard objects
it does not list (left by stopped attempts) are then deleted.
"""

from __future__ import annotations

import json
import queue
import secrets
from pathlib import Path

from labelgen import format as fmt
from labelgen import storage
from labelgen.config import GenerateConfig
from labelgen.format.manifest import check_shard_entry
from labelgen.pipeline import StageThread, put_to, take
from labelgen.shards import ShardInfo
from labelgen.storage import StorePath

QUEUE_DEPTH = 2


def progress_name(worker: int, num_workers: int) -> str:
    return f"progress.worker-{worker:04d}-of-{num_workers:04d}.json"


def staging_for(cfg: GenerateConfig) -> Path:
    """The local directory one worker of a bucket run writes its shards in first."""
    return storage.staging_dir(f"{cfg.out}#worker-{cfg.worker_index}-of-{cfg.num_workers}")


class BucketShards:
    """The finished shards of one worker of a bucket run (from its progress
    record) and the uploader of those it finishes now."""

    def __init__(self, cfg: GenerateConfig, remote: StorePath, local: Path):
        self.cfg, self.remote, self.local = cfg, remote, local
        self.attempt = secrets.token_hex(4)
        self.progress = remote / progress_name(cfg.worker_index, cfg.num_workers)
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

    def done(self, index: int) -> bool:
        return index in self.record

    def info(self, index: int) -> tuple[ShardInfo, int]:
        entry = self.record[index]
        return ShardInfo(**entry["shard"]), int(entry.get("skipped", 0))

    def closed(self, index: int, info: ShardInfo, counts: dict) -> None:
        """A shard the writer finished in the staging directory: upload it (in the background)."""
        put_to(self.queue, (index, info, counts.get("skipped", 0)), self.thread)

    def _upload(self, stop) -> None:
        while (item := take(self.queue, stop)) is not None:
            index, info, skipped = item
            local = self.local / info.name
            name = f"shard-{index:06d}-{self.attempt}{fmt.SHARD_SUFFIX}"
            storage.upload_file(local, self.remote / name)
            self.record[index] = {"shard": {**info.to_dict(), "name": name}, "skipped": skipped}
            storage.write_bytes(self.progress, json.dumps({"config_hash": self.cfg.output_hash(),
                                                           "attempt": self.attempt, "shards": self.record}).encode())
            storage.delete(local)

    def finish(self) -> dict[int, ShardInfo]:
        """Wait for the uploads; every shard of this worker, by index, under its object's name."""
        put_to(self.queue, None, self.thread)
        self.thread.join_checked()
        return {i: ShardInfo(**e["shard"]) for i, e in self.record.items()}

    def stop(self) -> None:
        self.thread.stop()


def publish(cfg: GenerateConfig, remote: StorePath, local: Path, manifest: dict, name: str) -> dict:
    """The run's last writes: the tokenizer (worker 0), then the manifest or
    the worker's partial manifest. manifest.json is created only if absent;
    then the shard objects it does not list are deleted."""
    if cfg.worker_index == 0:
        storage.upload_tree(local / fmt.TOKENIZER_DIR, remote / fmt.TOKENIZER_DIR)
    if name != fmt.MANIFEST_NAME:
        return fmt.write_manifest(remote, manifest, name)
    written = fmt.write_manifest(remote, manifest, name, if_absent=True)
    remove_unlisted(remote, written)
    return written


def remove_unlisted(remote: StorePath, manifest: dict) -> None:
    """Delete the shard objects under `remote` that the manifest does not list."""
    listed = {s["name"] for s in manifest["shards"]}
    for obj in storage.list_dir(remote, "shard-*" + fmt.SHARD_SUFFIX):
        if obj.name not in listed:
            storage.delete(obj)
