"""Command lines: `--config FILE key=value` into a typed config with help that lists every key and its default,
flags that stand for keys, and what every tool (not a trainer) does with bad input: one line, exit 2."""
import argparse
import dataclasses
import re
import sys
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from runtime.config import MISSING, ConfigError, load_config

T = TypeVar("T")
Shortcuts = Callable[[argparse.Namespace], List[str]]  # parsed flags -> the overrides they stand for


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if "%(default)" not in text and action.option_strings and shown:
            text += " (default: %(default)s)"
        return text


def schema_keys(schema: Type[Any], prefix: str = "", values: Any = None) -> List[Tuple[str, str]]:
    """(dotted key, default) for every key of a config schema, sections flattened; required keys say so."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if values is not None:
            default = getattr(values, f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        if dataclasses.is_dataclass(hints[f.name]):  # a section: its own defaults, or those its parent gives
            rows += schema_keys(hints[f.name], key + ".", default if dataclasses.is_dataclass(default) else None)
        else:
            rows.append((key, "required" if default is MISSING else repr(default)))
    return rows


def schema_epilog(schema: Type[Any]) -> str:
    keys = schema_keys(schema)
    width = max(len(k) for k, _ in keys)
    return "config keys (set in --config FILE or as key=value; defaults shown):\n" + "\n".join(
        f"  {k.ljust(width)}  {v}" for k, v in keys)


def check_repeated(overrides: Sequence[str]) -> None:
    """A key given twice on one command line is an error naming both values: the usual cause is a brace pattern
    left unquoted, which the shell expands into one `key=` word per shard (the last would win)."""
    seen: Dict[str, str] = {}
    for override in overrides:
        if "=" not in override:
            continue
        key, value = override.split("=", 1)
        key = key.strip()
        if key in seen:
            hint = ""
            if any(v.strip("[]").endswith(".tar") for v in (seen[key], value)):
                hint = (f" — an unquoted brace pattern is expanded by the shell into one word per shard; quote it: "
                        f"'{key}=[shards/train/{{00000..00007}}.tar]'")
            raise ConfigError(f"command line: key '{key}' is given more than once ({seen[key]!r}, then {value!r})"
                              + hint)
        seen[key] = value


def shortcut_flags(parser: argparse.ArgumentParser,
                   flags: Dict[str, str]) -> Shortcuts:
    """Flags that stand for config keys, declared on `parser`: {'--data': 'data.root'} takes a value,
    {'--from-scratch': 'encoder.from_scratch=true'} is a switch. Returns shortcuts(args) -> overrides, for
    parse_cli; errors about those keys name the flag as typed."""
    dests = {}
    for flag, target in flags.items():
        key = target.split("=", 1)[0]
        if "=" in target:
            action = parser.add_argument(flag, action="store_true", help=f"the same as {target}")
        else:
            action = parser.add_argument(flag, metavar=key.split(".")[-1].upper(), help=f"the same as {key}=...")
        dests[action.dest] = (flag, target)

    def overrides(args: argparse.Namespace) -> List[str]:
        out = []
        for dest, (flag, target) in dests.items():
            value = getattr(args, dest)
            if value in (None, False):
                continue
            out.append(target if "=" in target else f"{target}={value}")
            overrides.typed_as[target.split("=", 1)[0]] = flag  # of several flags for one key, the one typed
        return out
    overrides.typed_as = {**{target.split("=", 1)[0]: flag for flag, target in flags.items()},  # type: ignore
                          **{target: flag for flag, target in flags.items() if "=" in target}}
    return overrides


def name_flags(message: str, typed_as: Dict[str, str]) -> str:
    """A message about config keys, with each key a flag stands for written as that flag ('--data (data.root)'),
    since the user typed the flag."""
    for key, flag in sorted(typed_as.items(), key=lambda kv: -len(kv[0])):
        if "=" in key:  # a switch: 'encoder.from_scratch=true' is what --from-scratch sets
            message = message.replace(key, flag)
            continue
        message = re.sub(rf"'{re.escape(key)}'|(?<![\w.]){re.escape(key)}(?![\w.=])", f"{flag} ({key})", message)
        message = re.sub(rf"(?<![\w.]){re.escape(key)}=", f"{flag} ", message)
    return message


def parse_cli(schema: Type[T], argv: Optional[Sequence[str]] = None, description: str = "",
              parser: Optional[argparse.ArgumentParser] = None,
              shortcuts: Optional[Shortcuts] = None) -> Tuple[T, argparse.Namespace]:
    """`--config FILE key=value ...` into a typed config; extra flags may be declared on `parser` by the caller,
    and `shortcuts(args)` turns them into overrides. `--help` lists every key with its default; argparse exits
    0 after it and 2 on a usage error (SystemExit)."""
    parser = parser or argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.formatter_class = HelpFormatter
    parser.epilog = "\n\n".join(filter(None, [parser.epilog, schema_epilog(schema)]))
    parser.add_argument("--config", help="YAML config file (keys of the schema; unknown keys are errors)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides after the config file, e.g. optim.blr=1e-4 run.output_dir=runs/x")
    args = parser.parse_intermixed_args(argv)  # overrides before and after flags, as the old parser took them
    overrides = list(args.overrides) + (shortcuts(args) if shortcuts else [])
    typed_as = getattr(shortcuts, "typed_as", {})
    try:
        check_repeated(overrides)
        return load_config(schema, args.config, overrides), args
    except ConfigError as e:
        raise ConfigError(name_flags(str(e), typed_as)) from None


def bad_input_errors() -> Tuple[type, ...]:
    """What a tool reports as bad input: a missing file, one in the way, a checkpoint that does not fit, a bad
    value."""
    from runtime.checkpoint import CheckpointError  # (imports torch: only tools that get this far pay for it)
    return (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def with_one_line_errors(body: Callable[[], int], extra: Tuple[type, ...] = ()) -> int:
    """body()'s exit status; bad input (bad_input_errors(), and `extra`) is printed as one line `error: ...` and
    exits 2."""
    try:
        return body()
    except bad_input_errors() + extra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
