"""Leases: how a run holds an output in a bucket, where no flock reaches.

    with Lease(StorePath(...) / "labelgen.lease") as lease:
        ...
        lease.check()          # before each commit: raises if another host took the output over

The holder keeps an object beside the output: created only if absent
(If-None-Match), renewed every ttl/6 by a thread (If-Match on its own
version), deleted on exit. A run finding a fresh one refuses at once; one not
renewed for two periods is waited for until it expires, then taken over. A
lease is never trusted past its ttl (at most MAX_TTL) as this host sees it:
one renewed "in the future" (a host with a fast clock, or an object written
by hand) expires once it stays unchanged that long.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import socket
import sys
import threading
import time

from labelgen.errors import InUse
from labelgen.store import storage
from labelgen.store.storage import StorePath

LEASE_SUFFIX = ".lease"
MAX_TTL = 3600.0   # the longest a lease is honoured unrenewed, whatever its object says


def lease_name(worker: int, num_workers: int) -> str:
    return "labelgen" + (f".worker-{worker}-of-{num_workers}" if num_workers > 1 else "") + LEASE_SUFFIX


def lease_seconds() -> float:
    """How long a lease lasts unrenewed ($LABELGEN_LEASE_SECONDS, default 60); it is renewed every sixth of that."""
    return float(os.environ.get("LABELGEN_LEASE_SECONDS", "60"))


def _lease_info(data: bytes) -> dict:
    try:
        info = json.loads(data)
        renewed, ttl = float(info["renewed"]), float(info["ttl"])
    except (ValueError, KeyError, TypeError):
        return {}   # unreadable: expired
    if not (math.isfinite(renewed) and math.isfinite(ttl) and ttl > 0):
        return {}
    return {**info, "renewed": renewed, "ttl": min(ttl, MAX_TTL)}


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
    agree to well within the lease (NTP does). The conditions are the
    store's own: S3's If-None-Match/If-Match through boto3 (the s3 extra),
    GCS's ifGenerationMatch through google-cloud-storage (the gcs extra);
    without them, checks before the writes."""

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
        first: tuple[str, float] | None = None   # the version first found, and when (this host's clock)
        while self.tag is None:
            with contextlib.suppress(storage.AlreadyExists):
                self.tag = storage.write_bytes(self.path, self._body(), if_absent=True)
                break
            got = storage.read_versioned(self.path)
            if got is None:
                continue   # released meanwhile
            info, tag = _lease_info(got[0]), got[1]
            now = time.time()
            renewed = first is not None and tag != first[0]   # its holder renewed it while this run watched
            first = first if first is not None and not renewed else (tag, now)
            ttl = info.get("ttl", 0.0)
            age = now - info.get("renewed", 0.0)   # < 0: renewed "in the future" by its own clock
            unchanged = now - first[1]
            if not -ttl < age < ttl or unchanged >= ttl or _dead_here(info):   # a ttl ahead: no clock is that far off
                with contextlib.suppress(storage.AlreadyExists):
                    self.tag = storage.write_bytes(self.path, self._body(), if_match=tag)
                continue
            when = f"renewed {age:.0f}s ago" if age >= 0 else f"renewed {-age:.0f}s in the future by its host's clock"
            if renewed or (unchanged == 0 and 0 <= age < ttl / 3):   # renewed while watched, or fresh when found
                raise InUse(f"{self.path.parent}: in use by another labelgen run ({_holder(info)}; lease "
                                  f"{self.path.name} {when}); wait for it to end or stop it, then rerun")
            # Not renewed for two periods (its holder is likely gone), or not to be trusted: wait for it to run out.
            left = ttl - max(age, unchanged)
            if unchanged == 0:
                print(f"{self.path.parent}: waiting up to {left:.0f}s for the lease of another labelgen run to "
                      f"expire ({_holder(info)}; lease {self.path.name} {when})", file=sys.stderr, flush=True)
            time.sleep(min(left, ttl / 6) + 0.05)
        self._thread.start()
        return self

    def _renew(self) -> None:
        renewed = time.time()
        while not self._stop.wait(self.ttl / 6):
            try:
                self.tag = storage.write_bytes(self.path, self._body(), if_match=self.tag)
                renewed = time.time()
            except storage.AlreadyExists:
                self.lost = self._what_happened(time.time() - renewed)
                return
            except OSError:
                continue   # the store did not answer: try again at the next period, within the lease

    def _what_happened(self, unrenewed: float) -> str:
        """Why this run's lease object is no longer its own, in words."""
        try:
            got = storage.read_versioned(self.path)
        except OSError:
            return "its lease object changed"
        if got is None:
            return f"its lease object {self.path.name} was deleted"
        info = _lease_info(got[0])
        if not info:
            return f"its lease object {self.path.name} was overwritten with something that is not a lease"
        late = f" after this run had not renewed it for {unrenewed:.0f}s" if unrenewed >= self.ttl else ""
        return f"another run took this output over ({_holder(info)}){late}"

    def check(self) -> None:
        if self.lost is not None:
            raise InUse(f"{self.path.parent}: this run lost its hold on the output: {self.lost}; it stops "
                              "without committing")

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
    ttl = info.get("ttl", 0)
    if got and -ttl < time.time() - info.get("renewed", 0) < ttl and not _dead_here(info):
        return _holder(info)
    return None
