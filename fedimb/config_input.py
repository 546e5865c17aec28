"""Reading a config's input safely: the YAML file itself, and numbers that no range check catches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fedimb.errors import ConfigError


def read_config_file(path: Path) -> DictConfig:
    """The YAML mapping in ``path``; a missing, unreadable, empty or malformed file is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError("config", f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        loaded = yaml.safe_load(text)  # its shape first: OmegaConf asserts on a file that is one plain value
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path}: cannot read it ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("config", f"{path}: YAML syntax error{where}: {problem}") from None
    if loaded is None or loaded == {}:
        raise ConfigError("config", f"{path} is empty; give at least one key (e.g. name: my-run)")
    if not isinstance(loaded, dict):
        raise ConfigError("config", f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    try:
        return OmegaConf.create(text)  # OmegaConf's reading of the same text (its float and key rules)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path}: YAML error: {getattr(exc, 'problem', None) or exc}") from None


def check_finite(node: Any, name: str = "") -> None:
    """No NaN or infinity anywhere in a config (dataclasses, dicts, lists): range checks let them through."""
    if hasattr(node, "__dataclass_fields__"):
        node = {key: getattr(node, key) for key in node.__dataclass_fields__}
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, f"{name}.{key}" if name else str(key))
    elif isinstance(node, (list, tuple)):
        for value in node:
            check_finite(value, name)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(name, f"must be a finite number, got {node}")
