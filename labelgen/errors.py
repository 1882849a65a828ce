"""The error a bad label set, manifest or row raises: its own module so that
the lowest layers (fsutil) can raise it without importing the format."""


class FormatError(ValueError):
    """A shard, manifest or row that breaks the format. The message says where."""
