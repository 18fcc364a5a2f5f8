"""A simulated V2X channel: serialise, count, delay, lose, budget and perturb messages.

Per message handed to :meth:`Channel.transmit` in frame ``t`` on link sender -> receiver:

1. it is serialised (``encode``); its size is ``len()`` of those bytes;
2. budget: if the frame has a byte budget and the message does not fit in what remains, it is
   not sent (``"budget"``). Messages are admitted in the order given (the caller's priority),
   or smallest first with ``budget_order="smallest_first"``; a dropped message does not stop
   later, smaller ones;
3. otherwise it goes on air: its bytes are counted in the :class:`Ledger` for frame ``t``, the
   link and the kind. With probability ``loss`` it is lost (``"lost"``; the bytes still count,
   they were sent). A message split into packets (a list of :class:`Message` with ``packet``
   set) shares one fate under the budget, ``loss``, the delay and the pose noise; each of its
   packets is besides lost on its own with probability ``packet_loss`` (so is an unsplit
   message, one packet), and the receiver gets the packets that arrived;
4. the link keeps a history of what it carried; what the receiver gets in frame ``t`` is the
   entry from ``delay`` frames ago (or the newest one at least ``delay`` microseconds older
   than the current message), decoded from its bytes, so it carries its own, older, timestamp
   and pose. Nothing arrives when that entry was lost or the history is not that long yet
   (``"not_ready"``, e.g. the first frames of a sequence);
5. the decoded pose gets localisation noise: Gaussian x, y offsets (``xy_std_m``) and a
   rotation about the world z axis through the sensor (``yaw_std_deg``), as OpenCOOD perturbs
   ``[x, y, yaw]``;
6. the receiver checks what arrived (:mod:`v2xfuse.comm.checks`): bytes that do not decode, a
   sender id other than the link's, another kind, a pose that is not rigid or too far, an
   observation too old (when the caller gives the receiver's clock) and a timestamp already
   accepted on that link are dropped and counted by reason in ``ledger.rejected``.

With ``attack`` (:mod:`v2xfuse.comm.attack`) the channel also plays hostile collaborators: the
bytes of their messages are tampered after serialisation, before step 2, so the bytes counted are
the tampered ones and the receiver's checks are what stands between them and fusion.

All randomness comes from the Generator given to the channel; every message consumes the same
number of draws whatever happens to it, so one seed gives one outcome.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from ..utils.timing import null_timer
from .attack import AttackConfig, Attacker
from .checks import ReceiveChecks, Rejected, RejectionLog, check_rigid_pose
from .message import Message, MessageError, decode, encode

__all__ = ["LinkConfig", "Channel", "Ledger", "TxRecord", "perturb_pose"]

KB = 1000  # bytes; reports state KB = 1000 bytes
_NEVER = object()


@dataclass(frozen=True)
class LinkConfig:
    """How one sender -> receiver link behaves.

    Attributes:
        delay: fixed delay, or (lo, hi) sampled uniformly (inclusive) per link and frame.
        delay_unit: ``"frames"`` or ``"us"`` (microseconds, compared with message timestamps).
        loss: probability in [0, 1] that a message is lost whole.
        packet_loss: probability in [0, 1] that each packet is lost, independently.
        xy_std_m: std of the Gaussian x and y offsets added to the received pose, metres.
        yaw_std_deg: std of the Gaussian yaw rotation applied to the received pose, degrees.
    """

    delay: int | tuple[int, int] = 0
    delay_unit: str = "frames"
    loss: float = 0.0
    packet_loss: float = 0.0
    xy_std_m: float = 0.0
    yaw_std_deg: float = 0.0

    def __post_init__(self):
        lo, hi = self.delay_range()
        if not 0 <= lo <= hi:
            raise ValueError(f"delay must be >= 0 with lo <= hi, got {self.delay}")
        if self.delay_unit not in ("frames", "us"):
            raise ValueError(f"delay_unit must be 'frames' or 'us', got {self.delay_unit!r}")
        for name in ("loss", "packet_loss"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.xy_std_m < 0 or self.yaw_std_deg < 0:
            raise ValueError("noise stds must be >= 0")

    def delay_range(self) -> tuple[int, int]:
        d = self.delay
        return (int(d), int(d)) if np.isscalar(d) else (int(d[0]), int(d[1]))


@dataclass(frozen=True)
class TxRecord:
    """One message (or one packet of a split message: ``packet`` is its index) handed to the
    channel. ``status``: ``"sent"`` (on air, arrives after its delay), ``"lost"`` (on air,
    never arrives) or ``"budget"`` (not sent: over the budget)."""

    frame: Hashable
    sender: str
    receiver: str
    kind: str
    method: str
    num_bytes: int
    status: str
    packet: int | None = None

    @property
    def on_air(self) -> bool:
        return self.status != "budget"


@dataclass
class Ledger:
    """Byte counts of everything a channel sent. Bytes are ``len()`` of the serialised message,
    counted in the frame it was sent, summed over every link: what collaborators send the ego
    and, for methods that negotiate, the ego's requests to them (``per_kind`` separates them).
    No agent sends to itself.

    Attributes:
        records: every message handed to the channel, in order.
        frames: frame keys in the order first seen (frames where nothing was sent included).
        delivered: frame key -> number of messages the receivers got in that frame.
        not_ready: frame key -> messages with no old-enough history entry to deliver.
        rejected: messages that arrived and were dropped by the receiver's checks, by reason
            (``delivered`` counts them as arrived).
    """

    records: list[TxRecord] = field(default_factory=list)
    frames: list[Hashable] = field(default_factory=list)
    delivered: dict[Hashable, int] = field(default_factory=dict)
    not_ready: dict[Hashable, int] = field(default_factory=dict)
    rejected: RejectionLog = field(default_factory=RejectionLog)

    def begin_frame(self, frame: Hashable) -> None:
        if frame not in self.delivered:
            self.frames.append(frame)
            self.delivered[frame] = 0
            self.not_ready[frame] = 0

    def bytes_per_frame(self) -> list[int]:
        """(F,) bytes on air per frame, in ``frames`` order."""
        per = dict.fromkeys(self.frames, 0)
        for r in self.records:
            if r.on_air:
                per[r.frame] += r.num_bytes
        return list(per.values())

    def mean_bytes(self) -> float:
        b = self.bytes_per_frame()
        return float(np.mean(b)) if b else 0.0

    def percentile_bytes(self, q: float = 95.0) -> float:
        b = self.bytes_per_frame()
        return float(np.percentile(b, q)) if b else 0.0

    def _sum_by(self, key) -> dict:
        out: dict = {}
        for r in self.records:
            if r.on_air:
                out[key(r)] = out.get(key(r), 0) + r.num_bytes
        return out

    def per_link(self) -> dict[tuple[str, str], int]:
        """(sender, receiver) -> bytes on air."""
        return self._sum_by(lambda r: (r.sender, r.receiver))

    def per_kind(self) -> dict[str, int]:
        return self._sum_by(lambda r: r.kind)

    def per_method(self) -> dict[str, int]:
        return self._sum_by(lambda r: r.method)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    def summary(self) -> dict[str, float]:
        """Per-frame bytes (mean, p95, max), KB (1000 bytes), log2 of the mean bytes (the scale
        Where2comm/CodeFilling plot), and message counts by fate."""
        b = self.bytes_per_frame()
        mean = self.mean_bytes()
        return {"frames": len(b), "total_bytes": int(sum(b)), "mean_bytes": mean,
                "p95_bytes": self.percentile_bytes(95.0), "max_bytes": int(max(b, default=0)),
                "mean_kb": mean / KB, "log2_mean_bytes": math.log2(mean) if mean > 0 else float("-inf"),
                "sent": self.count("sent"), "lost": self.count("lost"), "budget": self.count("budget"),
                "delivered": int(sum(self.delivered.values())),
                "not_ready": int(sum(self.not_ready.values())),
                "rejected": self.rejected.total(),
                "rejected_messages": self.rejected.as_dict()}


@dataclass
class _Entry:
    timestamp_us: int
    # what arrives of one message: the bytes of each packet not lost (several copies if
    # duplicated); None: the message was lost whole
    data: list[bytes] | None


class Channel:
    """Simulated channel between agents (see the module docstring for the order of events).

    Args:
        rng: the only source of randomness (an int seeds ``np.random.default_rng``).
        link: behaviour of every link without an override.
        per_link: (sender, receiver) -> LinkConfig overrides.
        budget_bytes_per_frame: bytes all links together may carry per frame key, or None.
        budget_order: ``"given"`` or ``"smallest_first"``.
        history: entries kept per link (bounds memory; must exceed the largest delay in frames).
        checks: what the receiver holds every arrival to (default :class:`ReceiveChecks`).
        attack: hostile collaborators to play (default none).
    """

    def __init__(self, rng: np.random.Generator | int, link: LinkConfig = LinkConfig(),
                 per_link: dict[tuple[str, str], LinkConfig] | None = None,
                 budget_bytes_per_frame: int | None = None, budget_order: str = "given",
                 history: int = 64, checks: ReceiveChecks | None = None,
                 attack: AttackConfig | None = None):
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        if budget_order not in ("given", "smallest_first"):
            raise ValueError(f"budget_order must be 'given' or 'smallest_first', got {budget_order!r}")
        self.rng, self.link, self.per_link = rng, link, dict(per_link or {})
        self.budget, self.budget_order, self.history = budget_bytes_per_frame, budget_order, history
        for cfg in [link, *self.per_link.values()]:
            if cfg.delay_unit == "frames" and cfg.delay_range()[1] >= history:
                raise ValueError(f"history {history} too short for delay {cfg.delay} frames")
        self.ledger = Ledger()
        self.checks = checks or ReceiveChecks()
        self.attacker = Attacker(attack) if attack is not None and attack.type else None
        self._links: dict[tuple[str, str, str], deque[_Entry]] = {}
        self._last_frame: dict[tuple[str, str, str], Hashable] = {}
        self._spent: dict[Hashable, int] = {}
        # (sequence scope, sender, receiver, kind) -> timestamps accepted on that link
        self._accepted: dict[tuple, deque[int]] = {}

    def config(self, sender: str, receiver: str) -> LinkConfig:
        return self.per_link.get((sender, receiver), self.link)

    def reset(self) -> None:
        """Forget link histories and accepted timestamps (call between sequences, or before
        the same frames are sent again); the ledger is kept."""
        self._links.clear()
        self._last_frame.clear()
        self._accepted.clear()
        if self.attacker is not None:
            self.attacker.reset()

    def transmit(self, frame: Hashable, messages: Sequence[Message | Sequence[Message]],
                 receiver: str = "ego",
                 method: str = "", timer=None, now_us: int | None = None,
                 receiver_xyz=None, attackable: bool = True,
                 dedup_scope: Hashable = _NEVER) -> list[Message]:
        """Send ``messages`` (one per sender and kind; a list of packets for a split message)
        to ``receiver`` in frame ``frame``.

        Returns what the receiver gets this frame and accepts, decoded from bytes, in input
        order: for each message that arrives, the one its link carried ``delay`` ago (each of
        its packets that arrived, for a split one), with noisy pose, if it passes the
        receiver's checks. ``method`` labels the bytes in
        ``ledger.per_method()``. ``timer``: optional ``timer(stage)`` context
        (v2xfuse.utils.timing); encoding to bytes and decoding from them are timed as stage
        "serialise". ``now_us``: the receiver's clock, for the age check (None: no age check).
        ``receiver_xyz``: (3,) the receiver's position in the poses' world, for the range check
        (None: no range check).
        ``attackable``: whether the channel's attacker may tamper these messages (False for
        what a receiver's own ego sends). ``dedup_scope``: where a timestamp may be accepted
        only once per link; default the sequence of ``(dataset, sequence, frame)`` keys (pass
        ``frame`` when timestamps restart every frame, so only copies within it are refused).
        """
        timer = timer or null_timer
        groups = [[m] if isinstance(m, Message) else list(m) for m in messages]
        keys = [(g[0].sender, receiver, g[0].kind) for g in groups]
        for key in keys:
            if key[0] == receiver:
                raise ValueError(f"sender {key[0]!r} is the receiver: the ego sends nothing")
            if keys.count(key) > 1 or self._last_frame.get(key, _NEVER) == frame:
                raise ValueError(f"two messages on link {key} in frame {frame!r}")
        self.ledger.begin_frame(frame)
        with timer("serialise"):
            # per message, per packet: the copies that go on air
            wires = [[[encode(p)] for p in g] for g in groups]
        if self.attacker is not None and attackable:
            wires = [[self.attacker.tamper(frame, p, w[0], receiver) for p, w in zip(g, gw)]
                     for g, gw in zip(groups, wires)]
        packet_sizes = [[sum(len(b) for b in copies) for copies in gw] for gw in wires]
        sizes = [sum(ps) for ps in packet_sizes]
        order = list(range(len(groups)))
        if self.budget_order == "smallest_first":
            order.sort(key=lambda i: sizes[i])
        admitted = [False] * len(groups)
        for i in order:
            spent = self._spent.get(frame, 0)
            if self.budget is None or spent + sizes[i] <= self.budget:
                self._spent[frame] = spent + sizes[i]
                admitted[i] = True
        out = []
        for group, key, wire, psizes, ok in zip(groups, keys, wires, packet_sizes, admitted):
            msg = group[0]
            self._last_frame[key] = frame
            cfg = self.config(msg.sender, receiver)
            # fixed number of draws per message whatever its fate: one seed, one outcome.
            u_loss = self.rng.random()
            lo, hi = cfg.delay_range()
            delay = int(self.rng.integers(lo, hi + 1))
            noise = self.rng.standard_normal(3)
            packet_lost = (self.rng.random(len(group)) < cfg.packet_loss if cfg.packet_loss > 0
                           else np.zeros(len(group), bool))
            lost = u_loss < cfg.loss
            arrived: list[bytes] = []
            for packet, copies, size, gone in zip(group, wire, psizes, packet_lost):
                status = "budget" if not ok else ("lost" if lost or gone else "sent")
                self.ledger.records.append(TxRecord(
                    frame, msg.sender, receiver, msg.kind, method, size, status,
                    None if packet.packet is None else packet.packet[0]))
                if status == "sent":
                    arrived += copies
            hist = self._links.setdefault(key, deque(maxlen=self.history))
            hist.append(_Entry(msg.timestamp_us, arrived if ok and not lost else None))
            entry = self._pick(hist, delay, cfg.delay_unit)
            if entry is None:
                self.ledger.not_ready[frame] += 1
                continue
            if entry.data is None:
                continue
            for blob in entry.data:
                self.ledger.delivered[frame] += 1
                try:
                    with timer("serialise"):
                        rx = self._receive(blob, key, frame, now_us, receiver_xyz, dedup_scope)
                except Rejected as err:
                    self.ledger.rejected.add(err, key[0], key[2])
                    continue
                rx.world_from_lidar = perturb_pose(rx.world_from_lidar,
                                                   noise[:2] * cfg.xy_std_m,
                                                   math.radians(cfg.yaw_std_deg) * noise[2])
                out.append(rx)
        return out

    def _receive(self, blob: bytes, link: tuple[str, str, str], frame: Hashable,
                 now_us: int | None, receiver_xyz, scope: Hashable) -> Message:
        """Decode ``blob`` as the receiver of ``link`` (sender, receiver, kind) and check it
        (module docstring, step 6); raises :class:`Rejected`."""
        try:
            rx = decode(blob)
        except MessageError as err:
            raise Rejected("malformed", str(err)) from None
        sender, _, kind = link
        if rx.sender != sender:
            raise Rejected("sender", f"message says sender {rx.sender!r} on the link of {sender!r}")
        if rx.kind != kind:
            raise Rejected("kind", f"{rx.kind!r} on a {kind!r} link")
        check_rigid_pose(rx.world_from_lidar, self.checks, receiver_xyz)
        if now_us is not None:
            age = now_us - rx.timestamp_us
            if age > self.checks.max_age_us or -age > self.checks.max_future_us:
                raise Rejected("stale", f"timestamp {rx.timestamp_us} us is {age} us old "
                                        f"(accepted: -{self.checks.max_future_us}.."
                                        f"{self.checks.max_age_us})")
        if scope is _NEVER:
            scope = frame[:-1] if isinstance(frame, tuple) and len(frame) >= 2 else None
        seen = self._accepted.setdefault((scope, *link),
                                         deque(maxlen=self.checks.duplicate_window))
        stamp = rx.timestamp_us if rx.packet is None else (rx.timestamp_us, rx.packet[0])
        if stamp in seen:
            what = "" if rx.packet is None else f" (packet {rx.packet[0]})"
            raise Rejected("duplicate", f"timestamp {rx.timestamp_us} us{what} already accepted "
                                        f"from {sender!r}")
        seen.append(stamp)
        return rx

    @staticmethod
    def _pick(hist: deque, delay: int, unit: str) -> _Entry | None:
        if unit == "frames":
            return hist[-1 - delay] if delay < len(hist) else None
        cutoff = hist[-1].timestamp_us - delay
        for e in reversed(hist):
            if e.timestamp_us <= cutoff:
                return e
        return None


def perturb_pose(world_from_lidar: np.ndarray, dxy: np.ndarray, dyaw_rad: float) -> np.ndarray:
    """(4, 4) pose with its translation shifted by (dx, dy, 0) and its rotation turned by
    ``dyaw_rad`` about the world z axis (the sensor position stays put under the rotation)."""
    c, s = math.cos(dyaw_rad), math.sin(dyaw_rad)
    out = np.array(world_from_lidar, dtype=np.float64, copy=True)
    out[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ out[:3, :3]
    out[:2, 3] += dxy
    return out
