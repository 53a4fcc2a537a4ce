"""Flags and config files -> argument dataclasses.

Precedence, lowest first: preftune's defaults for the command, then the `--config` file (YAML or
JSON, keys named like the flags), then the flags on the command line. The config file is turned
into flags and parsed by the same parser, so a key behaves exactly like its flag.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


class UsageError(ValueError):
    """A bad flag, config key or config file: the message says which."""


class _Parser(HfArgumentParser):
    """HfArgumentParser that raises UsageError (one line) instead of printing usage and exiting,
    and that does not accept abbreviated flags (--bet would silently mean --beta)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _known_flags(parser: HfArgumentParser) -> list[str]:
    return sorted(
        {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    )


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of flag names to values."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--config: no such file: {path}")
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"--config {path}: not valid YAML/JSON: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}"
        )
    return data


def config_to_flags(config: dict[str, Any], known: list[str], source: str) -> list[str]:
    """{"beta": 0.1, "report_to": ["tensorboard"]} -> ["--beta", "0.1", "--report_to", "tensorboard"]."""
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).lstrip("-")
        if flag not in known:
            raise UsageError(
                f"--config {source}: unknown key {key!r}{_suggest(flag, known).replace('--', '')}"
            )
        if value is None:
            continue
        if isinstance(value, bool):
            flags += [flag, str(value).lower()]
        elif isinstance(value, list | tuple):
            flags += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, config = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a file path")
            config, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return config, rest


def parse_command_args(
    dataclass_types: tuple[type, ...],
    argv: list[str],
    defaults: dict[str, Any] | None = None,
    prog: str = "preftune",
) -> tuple[Any, ...]:
    """Parse defaults + config file + command-line flags into instances of `dataclass_types`."""
    parser = _Parser(
        dataclass_types,
        prog=prog,
        description="--config FILE: a YAML/JSON file of flag values; flags on the command line override it.",
    )
    known = _known_flags(parser)
    config_path, argv = _split_config_flag(argv)
    flags = config_to_flags(defaults or {}, known, "defaults")
    if config_path:
        flags += config_to_flags(read_config_file(config_path), known, config_path)
    flags += argv
    *parsed, remaining = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    if remaining:
        bad = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise UsageError(f"unknown flag {bad}{_suggest(bad, known)}; see `{prog} --help`")
    return tuple(parsed)
