"""Reading a config: YAML with the file line of every key, typed conversion, ``--set key=value`` overrides.

Unknown keys are errors with the file:line and the closest valid key; a value of the wrong type names its
key and where it came from (the file's line or the ``--set`` flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_glm.config.schema import GLMConfig
from megatron_glm.errors import ConfigError


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every key path ("model.num_layers" -> 12)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    lines: dict[str, int] = {}

    def walk(n: yaml.Node | None, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                path = f"{prefix}[{i}]"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    walk(node, "")
    return yaml.safe_load(text), lines


def _where(source: str | None, lines: dict[str, int], key: str) -> str:
    if source is None:
        return key
    line = lines.get(key)
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def _convert(value: Any, annotation: Any, key: str, where) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key, where)
    if origin is Literal:
        # Of the same type too: 1 is no True (and 0 no False) where a Literal lists booleans.
        if not any(value == arg and type(value) is type(arg) for arg in args):
            raise ConfigError(f"{where(key)}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where(key)}: expected a list, got {value!r}")
        return [_convert(item, args[0], f"{key}[{i}]", where) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where(key)}: expected a mapping of {annotation.__name__} keys, got {value!r}"
            )
        return _build(annotation, value, key, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key)}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where(key)}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key)}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _build(cls: type, values: dict, prefix: str, where) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where(path)}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], path, where)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.micro_batch_size=4"`` -> ("training.micro_batch_size", 4); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set training.micro_batch_size=4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def add_override_argument(
    parser: argparse.ArgumentParser, example: str = "training.train_steps=1000"
) -> None:
    """The ``--set KEY=VALUE`` option (repeatable, into ``args.overrides``) that ``load_config`` applies."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def config_from_dict(tree: dict, source: str | None = None, lines: dict[str, int] | None = None) -> GLMConfig:
    """A ``GLMConfig`` from an already-parsed tree (``lines``: the file line of each key, for messages)."""
    lines = lines or {}
    return _build_config(tree, source, lambda key: _where(source, lines, key))


def _build_config(tree: Any, source: str | None, where) -> GLMConfig:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source or 'config'}: the top level must be a mapping of sections")
    return _build(GLMConfig, tree, "", where)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> GLMConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides in order."""
    tree: dict = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        tree, lines = _yaml_with_lines(text, source)
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
        lines.pop(key, None)

    def where(key: str) -> str:
        if key in lines:
            return _where(source, lines, key)
        return (
            f"--set {key}"
            if any(o.split("=", 1)[0].strip() == key for o in overrides)
            else _where(source, lines, key)
        )

    return _build_config(tree, source, where)


def config_to_dict(cfg: GLMConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: GLMConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
