"""Where a ``lightning-tiger`` setting came from (which ``--config`` file or the command line) and what the
configured classes accept: the facts behind its error reports and checks."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMMAND_LINE",
    "SUBCOMMANDS",
    "Sources",
    "class_candidates",
    "config_sources",
    "import_class",
    "normalize_key",
    "parameters_of",
    "signature_of",
    "who_set",
    "who_set_index",
]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
COMMAND_LINE = "<command line>"
#: ``[(file or "<command line>", {dotted key as written: value})]`` in merge order.
Sources = list[tuple[str, dict[str, Any]]]


def normalize_key(key: str) -> str:
    """``fit.model.init_args.lr`` -> ``model.lr``: the form in which files and the command line are compared."""
    parts = [p for p in key.split(".") if p and p != "init_args"]
    if parts and parts[0] in SUBCOMMANDS:
        parts = parts[1:]
    return ".".join(parts)


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif prefix:
        key = prefix[:-1]
        # `optimizer: Tiger` chooses the class, as `optimizer: {class_path: Tiger}` does.
        if isinstance(node, str) and "." not in key and key in ("model", "data", "optimizer", "lr_scheduler"):
            key += ".class_path"
        yield key, node


def config_sources(argv: list[str]) -> Sources:
    """Where settings come from, in merge order: each ``--config`` file and each command-line override.

    Returns:
        ``[(file or "<command line>", {dotted key as written: value})]``.
    """
    out: Sources = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, value = None, None
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg.lstrip("-"), argv[i + 1]
            i += 1
        elif arg.startswith("--"):
            key, value = arg[2:], True
        i += 1
        if key in ("config", "c"):
            try:
                loaded = yaml.safe_load(Path(str(value)).read_text()) or {}
            except (OSError, yaml.YAMLError):
                loaded = {}
            out.append((str(value), dict(_flatten(loaded if isinstance(loaded, dict) else {}))))
        elif key is not None:
            out.append((COMMAND_LINE, dict(_flatten({key: _yaml_value(value)}))))
    return out


def _yaml_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def who_set_index(key: str, sources: Sources) -> int | None:
    """Index in ``sources`` of the setting of ``key`` in effect (merges are last-wins), or ``None`` (a default)."""
    wanted = normalize_key(key)
    hits = [i for i, (_, flat) in enumerate(sources) if any(normalize_key(k) == wanted for k in flat)]
    return hits[-1] if hits else None


def who_set(key: str, sources: Sources) -> str | None:
    """The source whose setting of ``key`` is in effect (merges are last-wins), or ``None`` (a default)."""
    index = who_set_index(key, sources)
    return None if index is None else sources[index][0]


def import_class(class_path: str | None) -> type | None:
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def parameters_of(class_path: str | None) -> list[inspect.Parameter]:
    cls = import_class(class_path)
    if cls is None:
        return []
    try:
        return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    except (ValueError, TypeError):
        return []


def signature_of(class_path: str | None) -> str:
    params = parameters_of(class_path)
    return f"{class_path.rpartition('.')[2]}({', '.join(str(p) for p in params)})" if params and class_path else ""


def class_candidates(node: Any, prefix: str = "") -> dict[str, str]:
    """Every configured class in a config dict: dotted key (list items by index) -> class_path."""
    found: dict[str, str] = {}
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str) and prefix:
            found[prefix[:-1]] = node["class_path"]
        for key, value in node.items():
            found.update(class_candidates(value, f"{prefix}{key}."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(class_candidates(value, f"{prefix}{i}."))
    return found
