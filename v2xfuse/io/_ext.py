"""The compiled PCD decoders of ``v2xfuse._C``, or None.

``v2xfuse._C`` links against libtorch, so torch is imported first (the dataset path has it
loaded anyway). ``V2XFUSE_NO_EXT=1`` in the environment, an unbuilt extension, or one built
before these functions existed all give None, and the callers use their pure-Python decoders.
"""
from __future__ import annotations

import os

_UNSET = object()
_module = _UNSET


def extension():
    """The ``v2xfuse._C`` module if it has the PCD decoders, else None (looked up once)."""
    global _module
    if _module is _UNSET:
        _module = None
        if os.environ.get("V2XFUSE_NO_EXT") != "1":
            try:
                import torch  # noqa: F401  (loads libtorch, which _C links against)
                from v2xfuse import _C
            except ImportError:
                pass
            else:
                if hasattr(_C, "lzf_decompress") and hasattr(_C, "pcd_ascii_parse"):
                    _module = _C
    return _module
