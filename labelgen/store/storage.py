"""The one storage layer: every label set, manifest, run file and checkpoint
is opened, listed, written, renamed and removed through it, on local disk or
in a bucket (s3://bucket/prefix, gs://bucket/prefix). `location(x)` gives a
`Path` or a `StorePath`, which answers the part of pathlib that readers use;
`open_input`/`open_parquet` read by ranged requests (a reader streams row
groups and never downloads a whole set); `write_bytes` commits a whole file or
object, conditionally where runs race. Buckets go through pyarrow.fs (boto3
for S3's conditional requests) with the usual environment: AWS_* credentials,
AWS_REGION, AWS_ENDPOINT_URL(_S3) for MinIO/Ceph/R2 (pyarrow itself does not
read it); gs:// uses Google's default credentials. fsutil.py is its local half.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from labelgen.errors import FormatError, LabelgenError, OptionError
from labelgen.store import bounded

SCHEMES = ("s3", "gs")


def location(where) -> "Path | StorePath":
    """A local Path, or a StorePath for an s3:// or gs:// URI."""
    if isinstance(where, (Path, StorePath)):
        return where
    where = os.fspath(where)
    if "://" not in where:
        return Path(where)
    scheme = where.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise OptionError(f"{where}: unsupported URI scheme {scheme!r}; use a local path, s3:// or gs://")
    parsed = urlparse(where)
    if not parsed.netloc:
        raise OptionError(f"{where}: no bucket in the URI")
    return StorePath(scheme, parsed.netloc, posixpath.normpath("/" + parsed.path).lstrip("/").rstrip("/"))


# What a store's error text means for the user, where it is known.
_DENIED = "access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's policy"
_CAUSES = (("OAuth2 access token", "no Google Cloud credentials (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth "
                                   "application-default login`)"),
           ("InvalidAccessKeyId", "the store does not know this S3 access key (AWS_ACCESS_KEY_ID)"),
           ("SignatureDoesNotMatch", "wrong S3 secret key (AWS_SECRET_ACCESS_KEY)"), ("AccessDenied", _DENIED),
           ("ACCESS_DENIED", _DENIED), ("NoSuchBucket", "no such bucket"))


def _failed(path, e: BaseException) -> OSError:
    """One line naming the object and, where the store's text says it, what is missing."""
    text = " ".join(str(e).split()) + ("; are Google Cloud credentials set up (GOOGLE_APPLICATION_CREDENTIALS)?"
                                       if isinstance(e, TimeoutError) and getattr(path, "scheme", "") == "gs" else "")
    return OSError(f"{path}: " + next((why for key, why in _CAUSES if key in text), text[:400]))


@functools.lru_cache(maxsize=None)
def filesystem(scheme: str):
    """The pyarrow filesystem of a scheme, configured from the environment, its calls bounded (bounded.py):
    without credentials GCS's client would retry or wait for many minutes, deaf to signals."""
    import datetime
    import pyarrow.fs as pafs
    if scheme == "gs":
        kw = {}
        if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):   # a GCS API of one's own (fake-gcs-server, ...)
            u = urlparse(emulator if "://" in emulator else "http://" + emulator)
            kw.update(endpoint_override=u.netloc, scheme=u.scheme, anonymous=True)
        return bounded.Filesystem(pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=15), **kw))
    kw = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    # Its socket timeouts: a write (a progress record, a shard part) to a store that stopped answering fails too.
    return bounded.Filesystem(pafs.S3FileSystem(connect_timeout=bounded.deadline(), request_timeout=bounded.deadline(),
                                                **kw))


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime_ns: int


@dataclass(frozen=True, order=True)
class StorePath:
    """An object (or prefix) in a bucket: scheme://bucket/key."""
    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    def __fspath__(self):   # os.fspath() must not pass a URI off as a local path
        raise TypeError(f"{self} is an object-store URI, not a local path")

    def __truediv__(self, name) -> "StorePath":
        name = str(name)
        # Names come from manifests: never let one climb out of its directory.
        if name.startswith("/") or ".." in name.split("/"):
            raise FormatError(f"{self}: {name!r} would lead out of the label directory")
        return StorePath(self.scheme, self.bucket, posixpath.join(self.key, name) if self.key else name)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> "StorePath":
        return StorePath(self.scheme, self.bucket, posixpath.dirname(self.key))

    @property
    def _fs_path(self) -> str:
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def _info(self):
        """pyarrow's FileInfo: its type is File, Directory (a prefix holding objects) or NotFound."""
        try:
            return filesystem(self.scheme).get_file_info(self._fs_path)
        except OSError as e:
            raise _failed(self, e) from None

    def is_file(self) -> bool:
        return self._info().type.name == "File"

    def is_dir(self) -> bool:
        return self._info().type.name == "Directory"

    def is_symlink(self) -> bool:
        return False

    def exists(self) -> bool:
        return self._info().type.name != "NotFound"

    def stat(self) -> _Stat:
        if (info := self._info()).type.name == "NotFound":
            raise FileNotFoundError(f"{self}: no such object")
        return _Stat(int(info.size or 0), int(info.mtime_ns or 0))

    def iterdir(self):
        """The objects and prefixes directly under this prefix, from one recursive listing: a store's own
        directory entries are not to be relied on (pyarrow lists GCS prefixes only where the store returns
        them as objects, which fake-gcs-server does not; a training run's step_*/ would be missed)."""
        from pyarrow.fs import FileSelector
        base, seen = self._fs_path.rstrip("/") + "/", set()
        for info in filesystem(self.scheme).get_file_info(FileSelector(self._fs_path, recursive=True,
                                                                       allow_not_found=True)):
            child = info.path[len(base):].split("/", 1)[0] if info.path.startswith(base) else ""
            if child and child not in seen:
                seen.add(child)
                yield StorePath(self.scheme, self.bucket, posixpath.join(self.key, child))

    def read_bytes(self) -> bytes:
        with open_input(self) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


def open_input(path, buffer_size: int = 0):
    """A seekable binary file (read, seek, tell, size) of a local path or an object."""
    if isinstance(path, StorePath):
        try:
            return filesystem(path.scheme).open_input_file(path._fs_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such object") from None
        except OSError as e:
            raise _failed(path, e) from None
    return open(path, "rb")


def open_parquet(path, **options):
    """A pyarrow ParquetFile of a local path or an object; from a bucket each
    row group's column chunks are fetched together (pre_buffer), by ranged reads."""
    import pyarrow.parquet as pq
    remote = isinstance(path, StorePath)
    return pq.ParquetFile(open_input(path) if remote else path, pre_buffer=remote, **options)


def read_head(path, max_bytes: int) -> bytes:
    """At most the first `max_bytes` of a file: a file from elsewhere is read
    within the size its reader expects, however large it claims or grew to be."""
    with open_input(path) as f:
        return f.read(max_bytes)


def footer_sha256(path) -> str:
    """sha256 of a Parquet file's footer (its metadata, length and magic)."""
    with open_input(path) as f:
        # An object's file knows its size; seeking to its end is a read past it, which GCS answers 416.
        size = f.size() if hasattr(f, "size") else f.seek(0, os.SEEK_END)
        if size < 12:
            raise FormatError(f"{path}: {size} bytes, too short for Parquet")
        f.seek(size - 8)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n + 12 > size:
            raise FormatError(f"{path}: no Parquet footer (truncated or not Parquet)")
        f.seek(size - 8 - n)
        return hashlib.sha256(f.read(n) + tail).hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_input(path) as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def cache_root() -> Path:
    """$LABELGEN_CACHE, default ~/.cache/labelgen: local copies of small remote files and staged bucket runs."""
    return Path(os.environ.get("LABELGEN_CACHE", Path.home() / ".cache" / "labelgen"))


def local_dir(path, max_bytes: int = 256 << 20) -> Path:
    """A local directory with the files of `path` (a tokenizer, say): the
    path itself when it is local, else a copy in a cache keyed by the URI,
    refreshed when an object's size changed. Subdirectories are not copied."""
    if not isinstance(path, StorePath):
        return Path(path)
    dest = cache_root() / "objects" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    from labelgen.store.fsutil import atomic_write_bytes
    total = 0
    for obj in path.iterdir():
        if not obj.name or not obj.is_file():
            continue
        size = obj.stat().st_size
        total += size
        if total > max_bytes:
            raise FormatError(f"{path}: more than {max_bytes >> 20} MiB to copy locally; not a tokenizer")
        target = dest / obj.name
        if not (target.is_file() and target.stat().st_size == size):
            atomic_write_bytes(target, obj.read_bytes())
    return dest


def staging_dir(uri) -> Path:
    """The local directory a run whose output is `uri` works in (checkpoints
    are written here first, then uploaded whole)."""
    return cache_root() / "runs" / hashlib.sha256(str(uri).encode()).hexdigest()[:16]


def list_tree(remote: StorePath) -> list[StorePath]:
    """Every object under `remote`, recursively."""
    from pyarrow.fs import FileSelector, FileType
    infos = filesystem(remote.scheme).get_file_info(FileSelector(remote._fs_path, recursive=True, allow_not_found=True))
    return [StorePath(remote.scheme, remote.bucket, i.path.split("/", 1)[1]) for i in infos if i.type == FileType.File]


def upload_tree(local: Path, remote: StorePath, last: str | None = None) -> None:
    """Copy the files under `local` to `remote`; files named `last` go after
    all others (a commit marker: readers trust what has one)."""
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for p in files:
        upload_file(p, remote / p.relative_to(local).as_posix())


def upload_file(local: Path, remote: StorePath) -> None:
    """One local file to one object (an object appears whole or not at all)."""
    import shutil
    with open(local, "rb") as src, filesystem(remote.scheme).open_output_stream(remote._fs_path) as out:
        shutil.copyfileobj(src, out, 1 << 20)


def download_tree(remote: StorePath, local: Path) -> None:
    """Copy every object under `remote` into `local` (through tmp files)."""
    for obj in list_tree(remote):
        rel = obj.key[len(remote.key):].lstrip("/")
        if ".." in Path(rel).parts:
            raise FormatError(f"{obj}: would lead out of {local}")
        download_file(obj, Path(local) / rel)


def download_file(remote: StorePath, local: Path) -> None:
    """One object to a local file, written through a tmp file."""
    from labelgen.store.fsutil import atomic_writer
    local.parent.mkdir(parents=True, exist_ok=True)
    with open_input(remote) as src, atomic_writer(local) as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)


class AlreadyExists(LabelgenError):
    """A conditional write found the object there (if_absent), or not as expected (if_match)."""


def write_bytes(path, data: bytes, if_absent: bool = False, if_match: str | None = None) -> str | None:
    """Write a whole file (tmp, fsync, rename) or object (one PUT: whole or
    absent); returns an object's version tag. It fails (AlreadyExists) with
    `if_absent` where `path` exists, with `if_match` unless its tag is that one:
    on S3 by a conditional PUT through boto3 (the `s3` extra: of two writers one
    wins), on GCS by a precondition on the object's generation through
    google-cloud-storage (the `gcs` extra: ifGenerationMatch, 0 to create),
    else by a check first (callers hold the run's lock locally)."""
    if not isinstance(path, StorePath):
        from labelgen.store.fsutil import atomic_write_bytes
        if if_absent and Path(path).exists():
            raise AlreadyExists(f"{path}: already exists")
        atomic_write_bytes(Path(path), data)
        return None
    conditional = if_absent or if_match is not None
    if conditional and path.scheme == "s3" and _boto3_client() is not None:
        import botocore.exceptions
        try:
            cond = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
            return _s3_request(path, "put_object", Body=data, **cond)["ETag"]
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                           "NoSuchKey", "404"):
                raise AlreadyExists(f"{path}: {'already exists' if if_absent else 'changed or gone'}") from None
            raise _failed(path, e) from None
    if conditional and path.scheme == "gs" and _gcs_available():
        from google.api_core.exceptions import NotFound, PreconditionFailed

        def put(blob):
            blob.upload_from_string(data, if_generation_match=0 if if_absent else int(if_match),
                                    timeout=bounded.deadline())
            return str(blob.generation)
        try:
            return _gcs_request(path, put)
        except (PreconditionFailed, NotFound):
            raise AlreadyExists(f"{path}: {'already exists' if if_absent else 'changed or gone'}") from None
    if if_absent and path.exists():
        raise AlreadyExists(f"{path}: already exists")
    if if_match is not None and (read_versioned(path) or (None, None))[1] != if_match:
        raise AlreadyExists(f"{path}: changed or gone")
    def put() -> None:
        with filesystem(path.scheme).open_output_stream(path._fs_path) as out:
            out.write(data)
    try:   # a small object (a record, a manifest): written within the deadline, like a metadata call
        bounded.call(put, limit=bounded.deadline())
    except OSError as e:
        raise _failed(path, e) from None
    return hashlib.sha256(data).hexdigest()


def read_versioned(path: "StorePath") -> tuple[bytes, str] | None:
    """(an object's bytes, its version tag for write_bytes' if_match), or None
    when it does not exist. The tag is S3's ETag through boto3, GCS's
    generation through google-cloud-storage, else a hash."""
    if path.scheme == "s3" and _boto3_client() is not None:
        import botocore.exceptions
        def get() -> tuple[bytes, str]:
            got = _boto3_client().get_object(Bucket=path.bucket, Key=path.key)
            return got["Body"].read(), got["ETag"]   # the body too: it streams from the same connection
        try:
            return bounded.call(get, limit=bounded.deadline())
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _failed(path, e) from None
        except (OSError, botocore.exceptions.BotoCoreError) as e:   # no answer in time, no connection
            raise _failed(path, e) from None
    if path.scheme == "gs" and _gcs_available():
        from google.api_core.exceptions import NotFound

        def get(blob):
            data = blob.download_as_bytes(timeout=bounded.deadline())
            return data, str(blob.generation)   # the generation of the bytes downloaded (its response's header)
        try:
            return _gcs_request(path, get)
        except NotFound:
            return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=None)
def _boto3_client():
    """An S3 client configured like pyarrow's (the same environment and
    deadline), or None without boto3. Its own timeouts and retries are bounded
    too: the lease's renewal thread calls it directly (bounded.py)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    limit = bounded.deadline()
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None,
                        config=Config(connect_timeout=limit, read_timeout=limit,
                                      retries={"total_max_attempts": 2, "mode": "standard"}))


def _s3_request(path: "StorePath", method: str, **kwargs):
    """One boto3 request about `path`, within the store deadline and stopped by a signal (bounded.call);
    a request without an answer in time fails naming the object."""
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        return bounded.call(getattr(_boto3_client(), method), Bucket=path.bucket, Key=path.key,
                            limit=bounded.deadline(), **kwargs)
    except ClientError:
        raise   # the store answered: the caller reads its error code
    except (OSError, BotoCoreError) as e:   # no answer in time, no connection
        raise _failed(path, e) from None


@functools.lru_cache(maxsize=None)
def _gcs_available() -> bool:
    """google-cloud-storage (the `gcs` extra) is installed: gs://'s conditional requests go through it."""
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _gcs_client():
    """A Cloud Storage client: Google's default credentials, or the emulator
    $STORAGE_EMULATOR_HOST names, anonymously, as pyarrow's client then is."""
    from google.cloud import storage as gcs
    if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials
        return gcs.Client(project="labelgen", credentials=AnonymousCredentials(), client_options={"api_endpoint": emulator})
    return gcs.Client()


def _gcs_request(path: "StorePath", fn):
    """fn(the blob at `path`), within the store deadline and stopped by a signal (bounded.call);
    a precondition or a missing object is the caller's to read, any other failure one line naming the object."""
    from google.api_core.exceptions import GoogleAPIError, NotFound, PreconditionFailed
    from google.auth.exceptions import GoogleAuthError
    try:
        return bounded.call(lambda: fn(_gcs_client().bucket(path.bucket).blob(path.key)), limit=bounded.deadline())
    except (PreconditionFailed, NotFound):
        raise
    except (OSError, GoogleAPIError, GoogleAuthError) as e:
        raise _failed(path, e) from None


def delete(path, if_match: str | None = None) -> None:
    """Remove one file or object (missing is fine); with `if_match`, an object
    only while its version tag is that one (a lease released by its holder)."""
    if not isinstance(path, StorePath):
        Path(path).unlink(missing_ok=True)
    elif if_match is not None and path.scheme == "s3" and _boto3_client() is not None:
        import botocore.exceptions
        with contextlib.suppress(botocore.exceptions.ClientError):   # gone, or no longer that version
            _s3_request(path, "delete_object", IfMatch=if_match)
    elif if_match is not None and path.scheme == "gs" and _gcs_available():
        from google.api_core.exceptions import NotFound, PreconditionFailed
        with contextlib.suppress(NotFound, PreconditionFailed):   # gone, or no longer that generation
            _gcs_request(path, lambda blob: blob.delete(if_generation_match=int(if_match), timeout=bounded.deadline()))
    elif if_match is None or (read_versioned(path) or (None, None))[1] == if_match:
        with contextlib.suppress(FileNotFoundError):
            filesystem(path.scheme).delete_file(path._fs_path)


def list_dir(path, pattern: str = "*") -> list:
    """The entries directly in a directory (or under a bucket prefix) whose
    names match `pattern`, sorted; [] when it does not exist."""
    import fnmatch
    path = location(path)
    found = path.iterdir() if isinstance(path, StorePath) or path.is_dir() else ()
    return sorted(p for p in found if fnmatch.fnmatchcase(p.name, pattern))


def read_text(path, max_bytes: int | None = None, errors: str = "strict") -> str:
    """A whole text file or object (at most `max_bytes` of it, when given)."""
    path = location(path)
    return (read_head(path, max_bytes) if max_bytes is not None else path.read_bytes()).decode("utf-8", errors)


def make_dir(path) -> None:
    """A local directory and its parents (a bucket prefix needs none)."""
    if not isinstance(path, StorePath):
        Path(path).mkdir(parents=True, exist_ok=True)


def remove_tree(path) -> None:
    """A directory (or everything under a bucket prefix) and all it holds; missing is fine."""
    if isinstance(path, StorePath):
        filesystem(path.scheme).delete_dir_contents(path._fs_path, missing_dir_ok=True)
        return
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def append_text(path: Path, text: str) -> None:
    """Append to a local file (a log: metrics.jsonl)."""
    with open(path, "a") as f:
        f.write(text)
