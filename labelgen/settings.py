"""Settings from a config file and flags: how both command lines fill their
config dataclasses (GenerateConfig, TrainConfig, ...), the file's keys
first, then the flags that were given."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

from labelgen.errors import OptionError


def renamed_note(where: str, old: str, new: str) -> None:
    """One line on stderr for a setting spelled as before a rename: it still works, for one release."""
    print(f"note: {where}{old} is now {new}; the old name is read until the next release", file=sys.stderr)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (YAML's spec forbids it; PyYAML would
    keep the last silently, so a setting written twice in a long run.yaml would be half-ignored)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def config_from_sources(cls, config_file: str | None, overrides: dict, tuple_fields=(), renamed=None):
    """A config dataclass from a YAML/JSON file's keys, then the flags that
    were given (None means not given). Unknown keys and missing required
    settings are errors naming the file or the flag. `renamed` maps a
    setting's old name to its new one: a file's old key is read under the
    new name with a one-line note."""
    d: dict = {}
    if config_file:
        path = Path(config_file)
        try:
            d = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}   # noqa: S506 (a SafeLoader)
        except yaml.constructor.ConstructorError as e:
            line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
            raise OptionError(f"{path}{line}: {e.problem}") from None
        except (OSError, yaml.YAMLError) as e:
            raise OptionError(f"{path}: cannot read config ({e})") from None
        if not isinstance(d, dict):
            raise OptionError(f"{path}: a config file must hold a mapping of settings")
        for old, new in (renamed or {}).items():
            if old in d:
                if new in d:
                    raise OptionError(f"{path}: {old!r} is the old name of {new!r}: keep one of the two keys")
                renamed_note(f"{path}: setting ", repr(old), repr(new))
                d[new] = d.pop(old)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise OptionError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    d.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d]
    if missing:
        flag = "input" if missing[0] == "inputs" else missing[0].replace("_", "-")
        raise OptionError(f"--{flag}: required (flag or config key {missing[0]!r})")
    for name in tuple_fields:
        if name in d:
            d[name] = tuple(d[name]) if isinstance(d[name], (list, tuple)) else (d[name],)
    return cls(**d)
