"""Adapter between the detector's batch-level interface and :class:`Channel`.

``Detector.forward(batch, channel=BatchChannel(Channel(rng)))`` sends each collaborator's payload
as a real :class:`Message`: every payload entry goes through the codec the fusion method names
in ``FusionMethod.codecs`` (``"raw"`` when it names none), the bytes are counted in
``channel.ledger`` per sample frame and link, and the fusion method receives what was decoded.

Poses in a batch are already relative to each sample's ego, so the message carries
``ego_from_agent`` as its ``world_from_lidar`` (the ego frame is the sample's world; isotropic xy
and yaw noise are the same in any world frame), and the receiver's range check measures from
the origin. Timestamps are each agent's sensor time (``meta["timestamp_us"]``), the ego's being
the receiver's clock, so the channel can refuse stale and replayed messages; a sample without
sensor times uses ``-time_delay_s`` with the ego's now at 0, and then replays cannot be told
apart. Channel delays in frames need batches in time order of one sequence; with shuffled
batches keep ``delay = 0`` and let the dataset age the senders.

Everything that arrives is checked before the fusion method sees it: by the channel
(:mod:`v2xfuse.comm.checks`), then the payload codecs (a codec that refuses its entries drops
the message as ``malformed``), then every float value finite and within
``checks.max_abs``, then the method's own ``check_payload``. A message that fails is dropped and
counted in ``ledger.rejected``; the ego fuses what remains.

Handshake methods (``FusionMethod.handshake``) also send reports (``transmit(..., kind="report")``)
and the ego's requests (:meth:`BatchChannel.request`, link ego -> sender, kind ``"request"``):
real messages through the same codecs, counted in the same ledger.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..fusion.base import FusionMethod, FusionState, Received
from ..fusion.payload_checks import largest_magnitude
from ..utils.timing import null_timer
from .channel import Channel
from .checks import Rejected
from .codecs import Codec, make_codec
from .message import Message, MessageError

__all__ = ["BatchChannel"]


class BatchChannel:
    """``transmit(fusion, batch, senders, payloads) -> list[Received]`` over a :class:`Channel`.

    Args:
        channel: the simulated channel; its ledger holds the byte counts.
        codec_options: codec name -> keyword arguments for :func:`make_codec`
            (e.g. ``{"codes": {"bits": 8}, "int8": {"axis": 0}}``).
        timer: optional ``timer(stage) -> context manager`` (see v2xfuse.utils.timing); payload
            codecs and message (de)serialisation are timed as stage "serialise".
    """

    def __init__(self, channel: Channel, codec_options: dict[str, dict] | None = None,
                 timer=None):
        self.channel = channel
        self.codec_options = dict(codec_options or {})
        self.timer = timer or null_timer

    @property
    def ledger(self):
        return self.channel.ledger

    def _codec(self, fusion: FusionMethod, name: str) -> Codec:
        codec_name = fusion.codecs.get(name, "raw")
        kwargs = {**self.codec_options.get(codec_name, {}), **fusion.codec_kwargs.get(name, {})}
        return make_codec(codec_name, name, **kwargs)

    def _entries(self, fusion: FusionMethod, payload: dict[str, torch.Tensor]) -> dict:
        entries: dict[str, np.ndarray] = {}
        for name, tensor in payload.items():
            entries.update(self._codec(fusion, name).encode(tensor))
        return entries

    def _accepted(self, fusion: FusionMethod, rx: Message, state: FusionState | None,
                  sample: int, device) -> dict[str, torch.Tensor] | None:
        """The payload of ``rx`` decoded through the method's codecs and checked (module
        docstring), or None when it was rejected (counted in the ledger)."""
        try:
            try:
                names = {k.split(".", 1)[0] for k in rx.payload}
                payload = {n: torch.from_numpy(np.ascontiguousarray(
                    self._codec(fusion, n).decode(rx.payload))).to(device) for n in names}
            except MessageError as err:
                raise Rejected("malformed", str(err)) from None
            limit = self.channel.checks.max_abs
            largest = {n: largest_magnitude(t) for n, t in payload.items() if t.is_floating_point()}
            for name, value in largest.items():
                if not math.isfinite(value):
                    raise Rejected("nonfinite", f"payload {name!r}: NaN or infinite values")
                if value > limit:
                    raise Rejected("bounds", f"payload {name!r}: |value| above {limit:g}")
            # finiteness is decided above: the method's own checks need not reduce again
            return fusion.check_payload(rx.kind, payload, state, sample, checked_finite=True)
        except Rejected as err:
            self.ledger.rejected.add(err, rx.sender, rx.kind)
            return None

    @staticmethod
    def _dedup_scope(meta: dict, frame: tuple) -> tuple:
        """Sensor times are unique within a sequence; relative times only within a frame."""
        return frame if meta.get("timestamp_us") is None else frame[:2]

    @staticmethod
    def _clock(meta: dict, local: int, delay_s: float) -> int:
        """Sensor time of the sample's agent ``local`` in microseconds (module docstring)."""
        stamps = meta.get("timestamp_us")
        if stamps is None:
            return -int(round(delay_s * 1e6))
        return int(stamps[local])

    def transmit(self, fusion: FusionMethod, batch, senders: list[int],
                 payloads: list[dict[str, torch.Tensor] | None],
                 kind: str | None = None, state: FusionState | None = None) -> list[Received]:
        """batch: a CoopBatch; senders: stacked agent indices; payloads: one dict per sender
        (None: that sender sends nothing); kind: of the messages (default
        ``fusion.message_kind``); state: the receiving ego's, for the method's checks.

        Returns what arrived and passed every check; each ``Received.delay_s`` is the ego's
        clock minus the message's timestamp."""
        sample_of = batch.sample_of_agent().tolist()
        ego_index = batch.ego_index().tolist()
        device = batch.ego_from_agent.device
        by_sample: dict[int, list[tuple[int, dict]]] = {}
        for i, p in zip(senders, payloads):
            if p is not None:
                by_sample.setdefault(sample_of[i], []).append((i, p))
        method = type(fusion).__name__
        out: list[Received] = []
        for b, items in sorted(by_sample.items()):
            meta = batch.meta[b]
            ids = [str(a) for a in meta["agent_ids"]]
            frame = (meta["dataset"], meta["sequence"], meta["frame"])
            index_of = {ids[i - ego_index[b]]: i for i, _ in items}
            now = self._clock(meta, 0, 0.0)
            msgs = []
            for i, p in items:
                local = i - ego_index[b]
                pose = batch.ego_from_agent[i].detach().cpu().double().numpy()
                pose[3] = (0.0, 0.0, 0.0, 1.0)
                with self.timer("serialise"):
                    entries = self._entries(fusion, p)
                ts = self._clock(meta, local, float(batch.time_delay_s[i]))
                msgs.append(Message(ids[local], kind or fusion.message_kind, ts, pose, entries))
            for rx in self.channel.transmit(frame, msgs, receiver=ids[0], method=method,
                                            timer=self.timer, now_us=now,
                                            receiver_xyz=np.zeros(3),
                                            dedup_scope=self._dedup_scope(meta, frame)):
                with self.timer("serialise"):
                    payload = self._accepted(fusion, rx, state, b, device)
                if payload is None:
                    continue
                pose = torch.from_numpy(rx.world_from_lidar).to(device, batch.ego_from_agent.dtype)
                out.append(Received(b, index_of[rx.sender], payload, pose,
                                    (now - rx.timestamp_us) / 1e6))
        return out

    def request(self, fusion: FusionMethod, batch, senders: list[int],
                payloads: list[dict[str, torch.Tensor] | None], kind: str = "request",
                state: FusionState | None = None) -> dict[int, dict[str, torch.Tensor]]:
        """Send each sender its ego's request (``FusionMethod.request``): one message of ``kind``
        per non-None payload, from the sample's ego (its pose: the identity, its timestamp: the
        ego's clock) to that sender, counted in the ledger like every other message. An empty payload sends the
        header alone: the ego's pose (kind ``"pose"``, for senders that work in the ego's axes).

        Returns:
            stacked sender index -> the request payload it decoded and accepted; absent when
            none was sent, or the channel lost it, or it failed the sender's checks.
        """
        sample_of = batch.sample_of_agent().tolist()
        ego_index = batch.ego_index().tolist()
        device = batch.ego_from_agent.device
        method = type(fusion).__name__
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in zip(senders, payloads):
            if p is None:
                continue
            b = sample_of[i]
            meta = batch.meta[b]
            ids = [str(a) for a in meta["agent_ids"]]
            frame = (meta["dataset"], meta["sequence"], meta["frame"])
            local = i - ego_index[b]
            now = self._clock(meta, 0, 0.0)
            with self.timer("serialise"):
                msg = Message(ids[0], kind, now, np.eye(4), self._entries(fusion, p))
            # The sender checks the ego's message as the ego checks its: at the same (synchronised)
            # clock, from its own position.
            receiver_xyz = batch.ego_from_agent[i, :3, 3].detach().cpu().double().numpy()
            for rx in self.channel.transmit(frame, [msg], receiver=ids[local], method=method,
                                            timer=self.timer, attackable=False, now_us=now,
                                            receiver_xyz=receiver_xyz,
                                            dedup_scope=self._dedup_scope(meta, frame)):
                with self.timer("serialise"):
                    payload = self._accepted(fusion, rx, state, b, device)
                if payload is not None:
                    out[i] = payload
        return out
