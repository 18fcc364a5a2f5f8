"""A faulty or hostile collaborator, played by the channel on purpose (``channel.attack``).

The tampering happens to the bytes after the sender serialised its message, as an attacker who
owns a collaborator's radio would do it, so what is tested is what the receiver checks
(:mod:`v2xfuse.comm.checks`), not what an honest encoder would refuse to write.

Which messages are hostile: each (frame, sender) pair independently with probability
``fraction``, drawn from ``seed`` (a hash of seed, frame and sender, so every round of a
handshake in one frame is tampered alike, and the channel's own random draws for loss, delay
and noise are the same as without the attack). Messages from a receiver's ego (requests, its
pose) are never tampered.

Attack types (what the attacker does to one message):

================  ======================================================================
nan, inf          every float payload value becomes NaN / +inf (the pose, when the payload
                  has no float array)
huge              every float payload value becomes 1e30 (the pose translation, likewise)
scale             every float payload value is multiplied by ``factor``: finite, possibly
                  within the checked bounds; what the receiver's clamping must withstand
nonrigid_pose     the pose's rotation is scaled by 2 and sheared
far_pose          the pose's translation is moved 1e6 m
spoof_ego         the sender id becomes the receiver's (a message claiming to be the ego's)
replay            the link's first message of the sequence is sent again instead
stale             the timestamp is set 10 s in the past
truncate          the message is cut to half its length
duplicate         the message is sent twice
wrong_shape       the largest payload array gains one column of zeros (along its last axis)
bad_index         the last element of every integer payload array (indices, cells) becomes
                  its dtype's maximum
================  ======================================================================
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from ..config import section_dataclass
from .message import HEADER_BYTES, Message, decode, encode

__all__ = ["AttackConfig", "Attacker", "ATTACKS"]

ATTACKS = ("nan", "inf", "huge", "scale", "nonrigid_pose", "far_pose", "spoof_ego", "replay",
           "stale", "truncate", "duplicate", "wrong_shape", "bad_index")
_POSE_OFFSET = 16  # bytes: the 12 float64 pose values follow magic, version, lengths, timestamp
assert _POSE_OFFSET + 12 * 8 == HEADER_BYTES  # the pose ends the fixed header (message.py)


@dataclass(frozen=True)
class AttackConfig:
    """``channel.attack``: ``{type, fraction, seed, factor}``; ``type: null`` disables it."""

    type: str | None = None
    fraction: float = 1.0
    seed: int = 0
    factor: float = 100.0

    def __post_init__(self):
        if self.type is not None and self.type not in ATTACKS:
            raise ValueError(f"channel.attack.type: {self.type!r} is not one of {ATTACKS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"channel.attack.fraction: {self.fraction} is not in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict | None) -> "AttackConfig":
        return section_dataclass(cls, d, "channel.attack")


def _scope(frame: Hashable) -> Hashable:
    """The sequence a frame key belongs to: ``(dataset, sequence)`` of ``(dataset, sequence,
    frame)`` keys; a frame key of any other form is its own scope."""
    return frame[:-1] if isinstance(frame, tuple) and len(frame) >= 2 else None


class Attacker:
    """Tampers the bytes of the hostile collaborators' messages (module docstring)."""

    def __init__(self, config: AttackConfig):
        self.config = config
        self._first: dict[tuple, bytes] = {}  # (scope, sender, receiver, kind) -> first blob

    def reset(self) -> None:
        self._first.clear()

    def hostile(self, frame: Hashable, sender: str) -> bool:
        cfg = self.config
        if cfg.type is None or cfg.fraction <= 0.0:
            return False
        key = zlib.crc32(repr((frame, sender)).encode())
        return bool(np.random.default_rng([cfg.seed, key]).random() < cfg.fraction)

    def tamper(self, frame: Hashable, msg: Message, blob: bytes, receiver: str) -> list[bytes]:
        """The bytes that go on air in place of ``blob`` (``msg`` serialised): ``[blob]`` when
        the sender is honest this frame, else one or more tampered copies."""
        link = (_scope(frame), msg.sender, receiver, msg.kind,
                None if msg.packet is None else msg.packet[0])
        first = self._first.setdefault(link, blob)
        if not self.hostile(frame, msg.sender):
            return [blob]
        kind = self.config.type
        if kind == "truncate":
            return [blob[: len(blob) // 2]]
        if kind == "duplicate":
            return [blob, blob]
        if kind == "replay":
            return [first]
        if kind in ("nan", "inf", "huge", "scale"):
            return [self._values(blob, kind)]
        rx = decode(blob)
        if kind == "spoof_ego":
            rx.sender = receiver
        elif kind == "stale":
            rx.timestamp_us -= 10_000_000
        elif kind == "nonrigid_pose":
            rx.world_from_lidar[:3, :3] = rx.world_from_lidar[:3, :3] @ np.array(
                [[2.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
        elif kind == "far_pose":
            rx.world_from_lidar[:2, 3] += 1e6
        elif kind == "wrong_shape":
            name = max(rx.payload, key=lambda n: rx.payload[n].size, default=None)
            if name is not None and rx.payload[name].ndim:
                arr = rx.payload[name]
                rx.payload[name] = np.concatenate([arr, np.zeros_like(arr[..., :1])], axis=-1)
        elif kind == "bad_index":
            for name, arr in rx.payload.items():
                if arr.dtype.kind in "iu" and arr.size and not name.endswith("shape"):
                    arr.reshape(-1)[-1] = np.iinfo(arr.dtype).max
        return [encode(rx)]

    def _values(self, blob: bytes, kind: str) -> bytes:
        rx = decode(blob)
        floats = [n for n, a in rx.payload.items() if a.dtype.kind == "f" and a.size]
        if not floats:  # nothing to poison but the pose: patch it in the header's bytes
            value = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30,
                     "scale": None}[kind]
            if value is None:
                return blob
            pose = np.array(struct.unpack_from("<12d", blob, _POSE_OFFSET))
            pose[[3, 7]] = value  # x and y of the translation
            out = bytearray(blob)
            struct.pack_into("<12d", out, _POSE_OFFSET, *pose)
            return bytes(out)
        for name in floats:
            arr = rx.payload[name]
            with np.errstate(over="ignore", invalid="ignore"):
                if kind == "scale":
                    rx.payload[name] = (arr * self.config.factor).astype(arr.dtype)
                else:
                    value = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[kind]
                    rx.payload[name] = np.full_like(arr, value)
        return encode(rx)
