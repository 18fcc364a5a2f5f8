"""Flat registries, one per component family, filled by ordinary imports.

    @FUSION.register("max")
    class MaxFusion(nn.Module): ...

    FUSION.get("max")  # -> MaxFusion

A duplicate name raises at import time; an unknown name raises with the known names listed.
"""
from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["Registry", "FUSION", "ENCODERS", "SENSOR_FUSERS", "BACKBONES", "HEADS", "DATASETS"]

T = TypeVar("T")


class Registry:
    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.family} {name!r} is already registered "
                               f"(by {self._items[name]!r}); names must be unique")
            self._items[name] = obj
            return obj
        return add

    def get(self, name: str):
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


FUSION = Registry("fusion method")
ENCODERS = Registry("encoder")
SENSOR_FUSERS = Registry("sensor fuser")
BACKBONES = Registry("BEV backbone")
HEADS = Registry("detection head")
DATASETS = Registry("dataset")
