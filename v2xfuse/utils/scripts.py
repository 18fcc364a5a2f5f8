"""Python files outside the package as modules (the scripts of tools/, test helpers): one tool (or
a test) uses another's functions without editing ``sys.path``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_script"]


def load_script(path: str | Path, fresh: bool = False) -> ModuleType:
    """The script at ``path`` as the module ``_v2xfuse_tool_<stem>``, registered in
    ``sys.modules`` (dataclasses look their module up there); the one loaded before is reused
    unless ``fresh``."""
    path = Path(path)
    key = f"_v2xfuse_tool_{path.stem}"
    if fresh or key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
