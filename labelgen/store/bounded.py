"""Calls that may hang (an object store's), made so that the process stays
in charge: the call runs in a daemon thread while the main thread waits in
short slices, so a signal's handler runs within a fraction of a second (a
preemption or Ctrl-C abandons the call and the run stops as it would
anywhere else), and a call given a deadline that gets no answer in time
fails with TimeoutError (an OSError) instead of blocking for minutes.

Only the main thread receives signals; calls from other threads (the bucket
uploader, DataLoader workers) are made directly.
"""

from __future__ import annotations

import os
import queue
import threading

METADATA_CALLS = ("get_file_info", "open_input_file", "open_input_stream", "delete_file", "delete_dir_contents")


def deadline() -> float:
    """Seconds a store may take to answer a metadata call ($LABELGEN_STORE_TIMEOUT, default 30)."""
    return float(os.environ.get("LABELGEN_STORE_TIMEOUT", "30"))


def call(fn, *args, limit: float | None = None, **kwargs):
    """fn(*args, **kwargs), leaving it behind on a signal or after `limit` seconds without an answer."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: queue.SimpleQueue = queue.SimpleQueue()

    def run() -> None:
        try:
            box.put((True, fn(*args, **kwargs)))
        except BaseException as e:
            box.put((False, e))
    threading.Thread(target=run, name="labelgen-store-call", daemon=True).start()
    waited = 0.0
    while True:
        try:
            ok, value = box.get(timeout=0.2)   # interrupted by a signal: its handler runs here
            break
        except queue.Empty:
            waited += 0.2
            if limit is not None and waited >= limit:
                raise TimeoutError(f"no answer in {limit:.0f} s ($LABELGEN_STORE_TIMEOUT)") from None
    if ok:
        return value
    raise value


class Filesystem:
    """A pyarrow filesystem whose calls go through `call`: metadata calls
    (listing, stat, opening for reading, deleting) with the deadline."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        method = getattr(self._fs, name)
        limit = deadline() if name in METADATA_CALLS else None
        return lambda *args, **kwargs: call(method, *args, limit=limit, **kwargs)
