"""The errors a user sees. Each is one line saying what and where (a file
and row, an option, an output), ends a command with its exit code, and
derives from LabelgenError; each layer raises its own subclass. `one_line`
turns any exception into that line. The lowest module of the package: every
layer may raise these without importing another."""


class LabelgenError(Exception):
    """A failure the user can act on; the command lines print it as one line and exit with `exit_code`."""
    exit_code = 2


class OptionError(LabelgenError, ValueError):
    """A value the user gave is refused: an option, a config setting, a path or URI ('--k: must be >= 1, got 0')."""


class FormatError(LabelgenError, ValueError):
    """A shard, manifest or row that breaks the format. The message says where."""


class OutputRefused(LabelgenError, ValueError):
    """The run directory refuses an output: it holds something else than this run (or this run, without
    --resume), or it is not a place labelgen writes (a symlink, a bucket's root)."""


class InUse(LabelgenError):
    """Another run holds the output: its lock, its lease, a worker still running; or this run lost its lease."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, at most `limit` characters (Arrow,
    thrift and transformers messages span several)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
