"""Fusion methods, one interface (:class:`FusionMethod`); importing this package registers them."""
from . import acco, attention, basic, codefilling, codyntrust, late_tc, quest  # noqa: F401
from .base import FusionMethod, FusionState, Received

__all__ = ["FusionMethod", "FusionState", "Received"]
