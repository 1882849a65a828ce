"""What both command lines (labelgen/cli.py, student_train/cli.py) share:
one-line errors and exit codes, option defaults shown from the config
dataclass, and a command's overrides read from its parameters. Neither CLI
imports the other."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from inspect import signature

import typer

from labelgen import stopping
from labelgen.errors import LabelgenError, one_line


def cli_errors(program: str, raise_on_preemption: bool):
    """The decorator `program`'s commands are wrapped in: a LabelgenError
    becomes its one line on stderr and its exit code; a system's error (a
    full disk, a missing file) or a value a library refused one line and 2;
    Ctrl-C one line and 130; with `raise_on_preemption` a preemption signal
    one line and PREEMPTED_EXIT (labelgen.stopping; a training loop reads its
    own flag instead), each followed by the command's `on_stop` (what was kept)."""
    def decorate(fn=None, *, on_stop: str = ""):
        if fn is None:
            return functools.partial(decorate, on_stop=on_stop)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                with stopping.raise_on_preemption() if raise_on_preemption else contextlib.nullcontext():
                    return fn(*args, **kwargs)
            except LabelgenError as e:
                typer.echo(f"{program}: error: {e}", err=True)
                raise typer.Exit(e.exit_code)
            except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
                typer.echo(f"{program}: error: {one_line(e)}", err=True)
                raise typer.Exit(2)
            except OSError as e:   # a full disk, an I/O error: the system's words, without a traceback
                where = f"{e.filename}: " if e.filename else ""
                typer.echo(f"{program}: error: {where}{e.strerror or one_line(e)}", err=True)
                raise typer.Exit(2)
            except KeyboardInterrupt as e:
                preempted = isinstance(e, stopping.Preempted)
                typer.echo(f"{program}: stopped by {e.name if preempted else 'SIGINT'}" + (f"; {on_stop}" if on_stop else ""),
                           err=True)
                raise typer.Exit(stopping.PREEMPTED_EXIT if preempted else 130)
        return wrapper
    return decorate


def show_defaults(cls):
    """Show each option's default, read from the config dataclass `cls`, in
    --help (the flags themselves default to None so a config file can fill them)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def decorate(fn):
        for name, param in signature(fn).parameters.items():
            info, f = param.default, fields.get(name)
            if not isinstance(info, typer.models.OptionInfo) or f is None or info.default is not None:
                continue
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = "required"
            info.show_default = "none" if value is None or value == () or value == {} else str(value)
        return fn
    return decorate


def overrides(cls, params: dict, **renamed) -> dict:
    """The settings a command's flags give for config dataclass `cls`: its
    parameters named like a field, plus `renamed` (field=value) for those
    spelled otherwise (--input for inputs); None means not given."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {**{k: v for k, v in params.items() if k in names}, **renamed}


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))
