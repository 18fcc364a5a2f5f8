"""YAML experiment configs: ``_base_`` inheritance, ``--set`` overrides, path resolution.

* ``_base_: other.yaml`` (or a list) is resolved relative to the file that names it, never to
  the working directory, so tools run from anywhere. Bases are merged first, in order; the
  including file wins. Mappings merge key by key; any other value (lists included) replaces.
  A mapping with ``_replace_: true`` replaces its base instead of merging into it.
* Relative filesystem paths under keys named ``root``, ``*_dir``, ``*_file`` or ``*_path`` are
  made absolute relative to the file that sets them.
* ``--set a.b.c=value`` overrides parse ``value`` as YAML (``1e-3``, ``[1, 2]``, ``true``,
  ``null``). The parent mapping must exist, so a typo fails loudly instead of training the
  wrong model.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml

__all__ = ["load_config", "apply_overrides", "dump_config", "merge", "ConfigError", "get_path"]



class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe loader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``).

    Configured once, on this subclass: PyYAML's resolver tables are class-level, and adding
    resolvers per load (as OpenCOOD does on the global loader) grows them without bound."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class ConfigError(ValueError):
    pass


def _is_path_key(key: str) -> bool:
    return key == "root" or key.endswith(("_dir", "_file", "_path"))


def _resolve_paths(node, base_dir: Path):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if isinstance(v, str) and _is_path_key(str(k)) and v and not os.path.isabs(v) \
                    and "://" not in v:
                out[k] = str((base_dir / v).resolve())
            else:
                out[k] = _resolve_paths(v, base_dir)
        return out
    if isinstance(node, list):
        return [_resolve_paths(v, base_dir) for v in node]
    return node


def merge(base: dict, child: dict) -> dict:
    """Deep-merge ``child`` into a copy of ``base`` (see the module docstring)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_replace_", False):
            out[k] = merge(out[k], v)
        else:
            out[k] = _strip_replace(copy.deepcopy(v))
    return out


def _strip_replace(node):
    if isinstance(node, dict):
        return {k: _strip_replace(v) for k, v in node.items() if k != "_replace_"}
    return node


def _load_file(path: Path, stack: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"_base_ cycle: {chain}")
    if not path.is_file():
        where = f" (named by {stack[-1]})" if stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = merge(merged, _load_file(path.parent / b, (*stack, path)))
    return merge(merged, _resolve_paths(raw, path.parent))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Load a config file with its bases, then apply ``key.path=value`` overrides."""
    cfg = _strip_replace(_load_file(Path(path), ()))
    return apply_overrides(cfg, overrides or [])


def get_path(cfg: dict, dotted: str, default=KeyError):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise KeyError(f"config has no key {dotted!r}")
            return default
        node = node[part]
    return node


#: sections a config may leave out and ``--set`` may create (``--set channel.attack.type=nan``);
#: the objects they configure check their keys, so a typo still fails, naming the key.
OPTIONAL_SECTIONS = frozenset({"channel", "channel.attack", "channel.checks", "eval"})


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse {text!r}: {e}") from None
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None and ".".join(parts[:depth + 1]) in OPTIONAL_SECTIONS:
                node[part] = {}
            if not isinstance(node.get(part), dict):
                known = ", ".join(sorted(k for k in node)) if isinstance(node, dict) else ""
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])!r} is not a section "
                                  f"of the config (known here: {known})")
            node = node[part]
        node[parts[-1]] = value
    return out


def section_dataclass(cls, section: dict | None, name: str):
    """``cls(**section)`` for a dataclass config section, a key it does not have raising
    ``KeyError`` that names the section, the unknown keys and the known ones."""
    section = dict(section or {})
    known = set(cls.__dataclass_fields__)
    unknown = set(section) - known
    if unknown:
        raise KeyError(f"{name}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return cls(**section)


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically) so a run can be reproduced from its folder."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yaml.dump(cfg, f, Dumper=_Dumper, sort_keys=False)
    os.replace(tmp, path)
