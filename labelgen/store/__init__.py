"""The store: every byte of a label set, run file or checkpoint goes through
here, on local disk or in a bucket. `storage` is the one storage layer
(local paths and s3:// gs:// alike), `fsutil` its local-disk half (atomic
writes, fsync, the flock), `bounded` the deadline and signal-aware waiting
that keeps a silent store from hanging a run."""
