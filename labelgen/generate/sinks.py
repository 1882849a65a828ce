"""Where a generation worker's finished shards go, and in which order: its
sink (`sink_for`) knows which shards are finished and commits those it
finishes, the manifest last (`commit_manifest`). GENERATE is what a
generation run writes in its output (the run directory reads it).

In a directory (LocalShards) a shard is committed by its writer's rename;
finished are the shards under their final name that this config made from
the same input records.

In a bucket (s3://, gs://; BucketShards) the pipeline works as on local
disk, in a staging directory of its own
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
from labelgen.errors import FormatError
from labelgen.format.manifest import check_shard_entry
from labelgen.generate.config import GenerateConfig
from labelgen.generate.pipeline import StageThread, put_to, take
from labelgen.generate.resume import same_slice
from labelgen.run.rundir import RunDir, RunKind
from labelgen.shards import ShardInfo, shard_counts, shard_info_from_file
from labelgen.store import storage

QUEUE_DEPTH = 2
PARTIAL_MANIFESTS = "manifest.worker-*-of-*.json"
PROGRESS_RECORDS = "progress.worker-*-of-*.json"
GENERATE = RunKind("generation run", fmt.LABEL_SET_FILES + (PARTIAL_MANIFESTS, PROGRESS_RECORDS),
                   marker=(fmt.RUN_FILE,), harmless=(fmt.RUN_FILE,), unit="finished shard", unit_pattern=fmt.SHARD_GLOB,
                   record=fmt.RUN_FILE)


def progress_name(worker: int, num_workers: int) -> str:
    return f"progress.worker-{worker:04d}-of-{num_workers:04d}.json"


def sink_for(rd: RunDir, cfg: GenerateConfig) -> "LocalShards | BucketShards":
    """This worker's shard sink in the run directory `rd`: its bucket, or the directory itself."""
    return BucketShards(cfg, rd) if rd.remote else LocalShards(cfg, rd)


def commit_manifest(rd: RunDir, manifest: dict, name: str = fmt.MANIFEST_NAME) -> dict:
    """A generation run's last write: manifest.json (or a worker's partial
    manifest `name`). In a bucket manifest.json is created only if absent (of
    two finalizers one wins; finalizing the same set again changes nothing),
    then the shard objects it does not list (stopped attempts') are deleted."""
    rd.check_held()
    if name != fmt.MANIFEST_NAME:
        return fmt.write_manifest(rd.where, manifest, name)
    if not rd.remote:
        written = fmt.write_manifest(rd.where, manifest)
    else:
        try:
            written = fmt.write_manifest(rd.remote, manifest, if_absent=True)
        except storage.AlreadyExists:
            written = fmt.read_manifest(rd.remote)
            if written.get("fingerprint") != fmt.dataset_fingerprint(manifest):
                raise FormatError(f"{rd.remote / fmt.MANIFEST_NAME}: already exists and lists other shards (another "
                                  "finalize won, or the run was finalized before); validate it, or delete it to "
                                  "finalize again") from None
        listed = set(written["shards"].names if isinstance(written["shards"], fmt.ShardTable) else
                     (s["name"] for s in written["shards"]))
        for obj in storage.list_dir(rd.remote, fmt.SHARD_GLOB):
            if obj.name not in listed:   # a stopped attempt's
                storage.delete(obj)
    table = (written.get("shard_table") or {}).get("name")
    for obj in storage.list_dir(rd.where, fmt.SHARD_TABLE_GLOB):
        if obj.name != table:   # an earlier finalize's, or a losing finalizer's
            storage.delete(obj)
    return written


class LocalShards:
    """This worker's shards in a local directory: finished are those under
    their final name that this config made from the same input records;
    they are committed in place (ShardFile renames them), the manifest last."""

    def __init__(self, cfg: GenerateConfig, rd: RunDir):
        self.out, self.cfg, self.rd = rd.local, cfg, rd

    def done(self, index: int, digest: str) -> bool:
        path = self.out / fmt.shard_name(index)
        if not path.is_file():
            return False
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            meta = fmt.read_file_metadata(pq.read_schema(path).metadata, str(path))
        except PermissionError:
            raise   # not a damaged shard: the run cannot read its own output
        except (OSError, pa.ArrowException, FormatError):
            return False   # cut short, damaged, or not a labelgen shard: redone
        return meta.get("config_hash") == self.cfg.output_hash() and same_slice(meta.get("input_sha256"), digest, self.cfg)

    def info(self, index: int) -> tuple[ShardInfo, int]:
        """(its ShardInfo, how many input records it skipped as bad: in its footer)."""
        path = self.out / fmt.shard_name(index)
        return shard_info_from_file(path, self.cfg.kind), shard_counts(path).get("skipped", 0)

    def closed(self, index: int, info: ShardInfo, counts: dict) -> None:
        """A shard the writer finished: already in place."""

    def finish(self, written: dict[int, ShardInfo], total: int) -> dict[int, ShardInfo]:
        """The shards written now; this worker's shard files at or past the
        input's end (`total` shards: the input shrank since they were
        written) are deleted, so the directory holds what a fresh run writes."""
        for path in storage.list_dir(self.out, "shard-*" + fmt.SHARD_SUFFIX):
            index = fmt.shard_index(path.name)
            if index is not None and index >= total and index % self.cfg.num_workers == self.cfg.worker_index:
                storage.delete(path)
        return written

    def stop(self) -> None:
        pass

    def publish(self, manifest: dict, name: str) -> dict:
        return commit_manifest(self.rd, manifest, name)




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
        return commit_manifest(self.rd, manifest, name)
