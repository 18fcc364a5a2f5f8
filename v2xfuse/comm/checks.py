"""What a receiver checks before any fusion method sees a message, and the count of what failed.

A message from another agent is untrusted input. :func:`decode` already refuses bytes that are
not a well-formed message; this module refuses well-formed messages that must not be used:

=============  ==========================================================================
reason         the message is dropped when
=============  ==========================================================================
malformed      its bytes do not decode (truncated, corrupt), or a payload codec refuses it
sender         its sender id is not the sender of the link it came on (spoofed, or the
               receiver's own id)
kind           it is not of the kind the receiver expects on that link
pose           its pose is not a rigid transform: ``||R^T R - I||_F <= rigid_tol`` and
               ``det R > 0``
far            its pose puts the sender farther than ``max_range_m`` from the receiver
stale          its observation is older than ``max_age_us``, or newer than the receiver's
               clock by more than ``max_future_us``
duplicate      a message of the same link and timestamp was already accepted (a replay, or a
               second copy in the same frame)
shape          a payload array is missing, has a dtype or shape the receiver does not expect
               (the grid, the codebook, the number of cells it names)
index          an index or code is out of range
nonfinite      a payload value is NaN or infinite
bounds         a payload value is outside the bounds the method allows (feature magnitudes far
               beyond those seen in training, scores outside [0, 1], boxes of impossible size)
=============  ==========================================================================

The receiver carries on with what remains; :class:`RejectionLog` counts the drops by reason and
logs the first of each reason once, naming sender, kind and the field.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..config import section_dataclass
from .message import MessageError

__all__ = ["Rejected", "ReceiveChecks", "RejectionLog", "REASONS", "check_rigid_pose",
           "largest_magnitude"]

log = logging.getLogger(__name__)

REASONS = ("malformed", "sender", "kind", "pose", "far", "stale", "duplicate", "shape", "index",
           "nonfinite", "bounds")


class Rejected(MessageError):
    """A received message that must not be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ReceiveChecks:
    """Limits every received message is held to (config section ``channel.checks``).

    Attributes:
        max_range_m: farthest sender position accepted, metres from the receiver. V2X sidelinks
            reach a few hundred metres; OPV2V's benchmark keeps collaborators within 70 m.
        max_age_us: oldest observation accepted, microseconds before the receiver's clock
            (2 s: four times the largest expected delay of the CoBEVFlow/CoDynTrust protocol).
        max_future_us: how far ahead of the receiver's clock a timestamp may be (clock skew).
        rigid_tol: tolerance on ``||R^T R - I||_F`` (Frobenius). The loaders accept dataset
            poses within 0.05 of rigid (DAIR-V2X's are orthonormal only to ~1e-3..1e-2, see
            v2xfuse/formats/checks.py) and a message's pose composes two of them, so the
            receiver allows twice that; a scale of 1.05, a shear of 0.1, a reflection or a
            singular matrix is refused.
        max_abs: bound on received float payload values when the method knows no tighter one
            (features of a trained model are O(1..100); 1e30 is an attack).
        duplicate_window: accepted timestamps remembered per link.
    """

    max_range_m: float = 300.0
    max_age_us: int = 2_000_000
    max_future_us: int = 100_000
    rigid_tol: float = 0.1
    max_abs: float = 1e6
    duplicate_window: int = 64

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReceiveChecks":
        return section_dataclass(cls, d, "channel.checks")


def largest_magnitude(t) -> float:
    """max |t| of a tensor (0 for no values); NaN or inf when ``t`` holds one: one reduction, a
    fraction of ``isfinite(t).all()``'s cost, decides both finiteness and bounds."""
    return float(t.abs().amax()) if t.numel() else 0.0


def check_rigid_pose(pose: np.ndarray, checks: ReceiveChecks, receiver_xyz=None,
                     what: str = "world_from_lidar") -> None:
    """Raise :class:`Rejected` unless ``pose`` (4, 4) is a rigid transform and, when the
    receiver's position ``receiver_xyz`` (3,) in the same world is given, within
    ``checks.max_range_m`` of it."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise Rejected("pose", f"{what}: not a finite 4x4 matrix")
    rot = pose[:3, :3]
    dev = float(np.linalg.norm(rot.T @ rot - np.eye(3)))
    det = float(np.linalg.det(rot))
    if not (dev <= checks.rigid_tol and det > 0):
        raise Rejected("pose", f"{what}: not a rotation (||R^T R - I|| = {dev:.3g}, "
                               f"det = {det:.3g}, tolerance {checks.rigid_tol})")
    if receiver_xyz is None:
        return
    offset = pose[:3, 3] - np.asarray(receiver_xyz, dtype=np.float64)
    # the max first: squaring a 1e300 offset would overflow
    dist = float(np.abs(offset).max())
    dist = float(np.linalg.norm(offset)) if dist <= checks.max_range_m else dist
    if not dist <= checks.max_range_m:
        raise Rejected("far", f"{what}: sender {dist:.4g} m away, beyond {checks.max_range_m} m")


class RejectionLog:
    """Counts of dropped messages by reason; the first drop of each reason is logged."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def add(self, err: Rejected, sender: str, kind: str) -> None:
        if not self.counts[err.reason]:
            log.warning("dropped a %r message from %r (%s); further %s drops are counted, "
                        "not logged", kind, sender, err, err.reason)
        self.counts[err.reason] += 1

    def as_dict(self) -> dict[str, int]:
        """reason -> count, reasons with no drop left out, in :data:`REASONS` order."""
        return {r: self.counts[r] for r in REASONS if self.counts[r]}

    def total(self) -> int:
        return sum(self.counts.values())
