"""Leases: how a run holds an output in a bucket, where no flock reaches.

    with Lease(StorePath(...) / "labelgen.lease") as lease:
        ...
        lease.check()          # before each commit: raises if another host took the output over

The holder keeps an object beside the output: created only if absent
(If-None-Match), renewed every ttl/6 by a thread (If-Match on its own
version), deleted on exit. A run finding a fresh one refuses at once; one not
renewed for two periods is waited for until it expires, then taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time

from labelgen import storage
from labelgen.errors import FormatError
from labelgen.storage import StorePath

LEASE_SUFFIX = ".lease"


def lease_name(worker: int, num_workers: int) -> str:
    return "labelgen" + (f".worker-{worker}-of-{num_workers}" if num_workers > 1 else "") + LEASE_SUFFIX


def lease_seconds() -> float:
    """How long a lease lasts unrenewed ($LABELGEN_LEASE_SECONDS, default 60); it is renewed every sixth of that."""
    return float(os.environ.get("LABELGEN_LEASE_SECONDS", "60"))


def _lease_info(data: bytes) -> dict:
    try:
        info = json.loads(data)
        return {**info, "renewed": float(info["renewed"]), "ttl": float(info["ttl"])}
    except (ValueError, KeyError, TypeError):
        return {}   # unreadable: expired


def _machine() -> str:
    """This host, boot and PID namespace: where a lease's pid can be checked."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(storage.read_text("/proc/sys/kernel/random/boot_id").strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def _dead_here(info: dict) -> bool:
    """The lease's holder ran on this machine (and PID namespace) and its process is gone (killed with -9, say)."""
    if info.get("machine") != _machine():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


def _holder(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}: {info.get('command', '')}".strip(": ")


class Lease:
    """An output in a bucket held by one run on one host. Object stores have
    no flock, so the holder keeps an object beside the output: created only
    if absent (If-None-Match), renewed every ttl/6 by a thread (If-Match on
    its own version), deleted on exit. Another run finding it refuses at once
    while it is fresh; one not renewed for two periods (its holder killed,
    say) is waited for until it expires, then taken over (If-Match on the
    expired version, so of two takers one wins); at once if its holder ran on
    this machine and its process is gone. Clocks of the hosts must
    agree to well within the lease (NTP does). Without boto3 (the s3 extra)
    and on gs://, the conditions are checks before the writes."""

    def __init__(self, path: StorePath, ttl: float | None = None):
        self.path, self.ttl = path, ttl or lease_seconds()
        self.tag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="labelgen-lease", daemon=True)
        self._me = {"holder": secrets.token_hex(8), "host": socket.gethostname(), "machine": _machine(),
                    "pid": os.getpid(), "command": " ".join(sys.argv)[:300], "ttl": self.ttl}

    def _body(self) -> bytes:
        return json.dumps({**self._me, "renewed": time.time()}).encode()

    def __enter__(self) -> "Lease":
        seen_stale = None
        while self.tag is None:
            with contextlib.suppress(storage.AlreadyExists):
                self.tag = storage.write_bytes(self.path, self._body(), if_absent=True)
                break
            got = storage.read_versioned(self.path)
            if got is None:
                continue   # released meanwhile
            info, tag = _lease_info(got[0]), got[1]
            age = time.time() - info.get("renewed", 0.0)
            if age >= info.get("ttl", 0.0) or _dead_here(info):
                with contextlib.suppress(storage.AlreadyExists):
                    self.tag = storage.write_bytes(self.path, self._body(), if_match=tag)
                continue
            if age < info["ttl"] / 3 or (seen_stale is not None and tag != seen_stale):
                raise FormatError(f"{self.path.parent}: in use by another labelgen run ({_holder(info)}; lease "
                                  f"{self.path.name} renewed {age:.0f}s ago); wait for it to end or stop it, then rerun")
            seen_stale = tag   # not renewed for two periods: its holder is likely gone; wait for the lease to run out
            time.sleep(min(info["ttl"] - age, info["ttl"] / 6) + 0.05)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            try:
                self.tag = storage.write_bytes(self.path, self._body(), if_match=self.tag)
            except storage.AlreadyExists:
                got = storage.read_versioned(self.path)
                self.lost = _holder(_lease_info(got[0])) if got else "its lease was deleted"
                return
            except OSError:
                continue   # the store did not answer: try again at the next period, within the lease

    def check(self) -> None:
        if self.lost is not None:
            raise FormatError(f"{self.path.parent}: another run took this output over ({self.lost}) after this "
                              "one stopped renewing its lease; this run stops without committing")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost is None and self.tag is not None:
            with contextlib.suppress(OSError):
                storage.delete(self.path, if_match=self.tag)


def live_holder(obj: StorePath) -> str | None:
    """Who holds the lease object `obj` ('pid N on HOST: command'), or None when it has expired or its holder is gone."""
    got = storage.read_versioned(obj)
    info = _lease_info(got[0]) if got else {}
    if got and time.time() - info.get("renewed", 0) < info.get("ttl", 0) and not _dead_here(info):
        return _holder(info)
    return None
