"""Detection heads, peers behind :class:`~.base.Head`; importing this package registers them in
``HEADS``."""
from . import anchor_head  # noqa: F401
from . import center_head  # noqa: F401
from . import query_head  # noqa: F401
from .base import Head, OutsideGrid

__all__ = ["Head", "OutsideGrid"]
