"""The generation job's plumbing: stage threads whose errors reach the main
thread, queue operations that give up when a stage stops, and the progress bar."""

from __future__ import annotations

import queue
import threading
import time

from labelgen.generate.config import GenerateConfig


class StageThread(threading.Thread):
    """A worker thread whose exception re-raises in the main thread."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.fn, self.args, self.error, self.result = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args, self.stop_event)
        except BaseException as e:  # re-raised by the main thread
            self.error = e

    def join_checked(self):
        self.join()
        if self.error:
            raise self.error

    def stop(self):
        """Ask the thread to end and wait for it: it checks the event at
        every queue operation (`_offer`/`_take`), so it never waits on a queue
        that nobody serves any more (a reader blocked on a full queue once
        deadlocked Ctrl-C and a full disk)."""
        self.stop_event.set()
        self.join()


def offer(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` on `q` unless `stop` is set first; True if it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def take(q: queue.Queue, stop: threading.Event):
    """The next item of `q`, or None once `stop` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def get_from(q: queue.Queue, producer: StageThread):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if producer.error:
                raise producer.error
            if not producer.is_alive() and q.empty():
                raise RuntimeError("input reader stopped unexpectedly")


def put_to(q: queue.Queue, item, consumer: StageThread):
    while True:
        if consumer.error:
            raise consumer.error
        try:
            return q.put(item, timeout=0.1)
        except queue.Full:
            continue


class Progress:
    """Input read (the bar and its ETA: bytes, known without a counting
    pass), examples done and teacher tokens/s."""

    def __init__(self, cfg: GenerateConfig, input_bytes: int):
        self.tokens = self.examples = self.done = 0
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=input_bytes, unit="B", unit_scale=True, desc=f"labelgen {cfg.mode}", dynamic_ncols=True)
            self.t0 = time.time()

    def update(self, examples: int, tokens: int, input_bytes: int | None = None):
        self.tokens += tokens
        self.examples += examples
        if self.bar is not None:
            if input_bytes is not None and input_bytes > self.done:
                self.bar.update(input_bytes - self.done)
                self.done = input_bytes
            self.bar.set_postfix_str(f"{self.examples:,} ex, {self.tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s",
                                     refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
