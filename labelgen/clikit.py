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
from labelgen.errors import LabelgenError, OptionError, one_line
from labelgen.settings import renamed_note


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


def show_defaults(cls, panels: dict[str, str] | None = None, shown: dict[str, str] | None = None, **fields_of: str):
    """Show each option's default, read from the config dataclass `cls`, in
    --help (the flags themselves default to None so a config file can fill
    them); a setting without a default is marked required. `panels` maps a
    help panel's title to the parameters it groups (space-separated);
    `shown` words a default that the field's None stands for (it depends on
    the labels); `fields_of` names the field of a parameter spelled
    otherwise (input="inputs")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    panel_of = {name: title for title, names in (panels or {}).items() for name in names.split()}

    def decorate(fn):
        for name, param in signature(fn).parameters.items():
            info, f = param.default, fields.get(fields_of.get(name, name))
            if isinstance(info, typer.models.ParameterInfo) and name in panel_of:
                info.rich_help_panel = panel_of[name]
            if not isinstance(info, typer.models.OptionInfo) or f is None or info.default is not None:
                continue
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                info.help, info.show_default = f"{info.help} (required: this flag or the config file's key)", False
                continue
            info.show_default = (shown or {}).get(name) or ("none" if value in (None, (), {}) else str(value))
        return fn
    return decorate


def overrides(cls, params: dict, old_names: dict | None = None, **renamed) -> dict:
    """The settings a command's flags give for config dataclass `cls`: its
    parameters named like a field, plus `renamed` (field=value) for those
    spelled otherwise (--input for inputs); None means not given.
    `old_names` maps a hidden parameter kept under a setting's old name to
    the new one: given, it counts as the new flag, with a one-line note."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {**{k: v for k, v in params.items() if k in names}, **renamed}
    for old, new in (old_names or {}).items():
        if params.get(old) is not None:
            flag_old, flag_new = (f"--{n.replace('_', '-')}" for n in (old, new))
            if out.get(new) is not None:
                raise OptionError(f"{flag_old}: the old name of {flag_new}: pass one of the two")
            renamed_note("", flag_old, flag_new)
            out[new] = params[old]
    return out


def version_option(program: str):
    """A --version option for `program`'s Typer app callback: the package and the label format it writes."""
    def show(value: bool) -> None:
        if value:
            from importlib.metadata import PackageNotFoundError, version
            from labelgen.format.manifest import SHARD_TABLE_MIN
            from labelgen.format.schema import FORMAT_VERSION
            try:
                mine = version("labelgen")
            except PackageNotFoundError:
                mine = "(not installed: run from a checkout)"
            typer.echo(f"{program} {mine} (label format {FORMAT_VERSION}; the shard list in a table past "
                       f"{SHARD_TABLE_MIN:,} shards)")
            raise typer.Exit()
    return typer.Option(False, "--version", callback=show, is_eager=True, help="print the version and exit")


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))
