"""Per-stage wall-clock timing hooks for the detector and the channel.

Code that wants to be timeable takes an optional ``timer`` and wraps each stage::

    stage = timer or null_timer
    with stage("encode"):
        features = backbone(encoder(points))

``null_timer`` does nothing, so untimed runs pay one ``nullcontext`` per stage.
:class:`StageTimer` records seconds per stage name. Stages may nest (the channel stage contains
the serialise stage); each stage's time is *exclusive* of the stages nested in it, so the stage
times of a run add up to the time spent inside any stage.
"""
from __future__ import annotations

import contextlib
import time

__all__ = ["null_timer", "StageTimer"]


def null_timer(stage: str) -> contextlib.AbstractContextManager:
    """The default timer: a no-op context for every stage name."""
    return contextlib.nullcontext()


class StageTimer:
    """Accumulates exclusive seconds per stage name until :meth:`pop`.

    Args:
        device: a torch device or its name; on a CUDA device every stage boundary calls
            ``torch.cuda.synchronize`` so that queued kernels are charged to the stage that
            launched them.
    """

    def __init__(self, device=None):
        # torch is imported only to synchronise: the channel (numpy only) imports this module.
        self._cuda = device if device is not None and str(device).startswith("cuda") else None
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start of the current uninterrupted slice]

    def _now(self) -> float:
        if self._cuda is not None:
            import torch

            torch.cuda.synchronize(self._cuda)
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        now = self._now()
        if self._stack:  # pause the enclosing stage
            outer = self._stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([stage, now])
        try:
            yield
        finally:
            now = self._now()
            name, start = self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + now - start
            if self._stack:  # resume it
                self._stack[-1][1] = now

    def pop(self) -> dict[str, float]:
        """Seconds per stage since the last pop; starts a new record."""
        if self._stack:
            raise RuntimeError(f"pop() inside stage {self._stack[-1][0]!r}")
        out, self.seconds = self.seconds, {}
        return out
