"""Adapter between the detector's batch-level interface and :class:`Channel`.

``Detector.forward(batch, channel=BatchChannel(Channel(rng)))`` sends each collaborator's payload
as a real :class:`Message`: every payload entry goes through the codec the round's
:class:`~v2xfuse.comm.wire.WireFormat` names for it (an entry without one is an error), the
bytes are counted in ``channel.ledger`` per sample frame and link, and the fusion method
receives what was decoded. The channel sees wire formats, never the fusion method.

Poses in a batch are already relative to each sample's ego, so the message carries
``ego_from_agent`` as its ``world_from_lidar`` (the ego frame is the sample's world; isotropic xy
and yaw noise are the same in any world frame), and the receiver's range check measures from
the origin. Timestamps are each agent's sensor time (``FrameRecord.timestamp_us``), the ego's being
the receiver's clock, so the channel can refuse stale and replayed messages; a sample without
sensor times uses ``-delay_us`` with the ego's now at 0, and then replays cannot be told
apart. Channel delays in frames need batches in time order of one sequence; with shuffled
batches keep ``delay = 0`` and let the dataset age the senders.

Everything that arrives is checked before the fusion method sees it: by the channel
(:mod:`v2xfuse.comm.checks`), then the payload codecs (a codec that refuses its entries drops
the message as ``malformed``), then every float value finite and within
``checks.max_abs``, then the method's own ``check_payload``. A message that fails is dropped and
counted in ``ledger.rejected``; the ego fuses what remains.

Handshake methods (``contract.handshake``) also send reports (a ``transmit`` of kind
``"report"``) and the ego's requests (:meth:`BatchChannel.request`, link ego -> sender, kind
``"request"``): real messages through the same codecs, counted in the same ledger.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..utils.timing import null_timer
from .channel import Channel
from .checks import Rejected, largest_magnitude
from .message import Message, MessageError
from .received import Received
from .wire import WireFormat

__all__ = ["BatchChannel"]


class BatchChannel:
    """``transmit(wire, batch, senders, payloads) -> list[Received]`` over a :class:`Channel`.

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

    def _entries(self, wire: WireFormat, payload: dict[str, torch.Tensor]) -> dict:
        entries: dict[str, np.ndarray] = {}
        for name, tensor in payload.items():
            entries.update(wire.codec(name, self.codec_options).encode(tensor))
        return entries

    def _accepted(self, wire: WireFormat, rx: Message, state, sample: int,
                  device) -> dict[str, torch.Tensor] | None:
        """The payload of ``rx`` decoded through the wire format's codecs and checked (module
        docstring), or None when it was rejected (counted in the ledger)."""
        try:
            names = {k.split(".", 1)[0] for k in rx.payload}
            unexpected = sorted(names - set(wire.codecs))
            if unexpected:
                raise Rejected("shape", f"payload arrays {unexpected} are not among "
                                        f"{sorted(wire.codecs)}")
            try:
                payload = {n: torch.from_numpy(np.ascontiguousarray(
                    wire.codec(n, self.codec_options).decode(rx.payload))).to(device)
                    for n in names}
            except MessageError as err:
                raise Rejected("malformed", str(err)) from None
            limit = self.channel.checks.max_abs
            largest = {n: largest_magnitude(t) for n, t in payload.items() if t.is_floating_point()}
            for name, value in largest.items():
                if not math.isfinite(value):
                    raise Rejected("nonfinite", f"payload {name!r}: NaN or infinite values")
                if value > limit:
                    raise Rejected("bounds", f"payload {name!r}: |value| above {limit:g}")
            if wire.check is None:
                return payload
            # finiteness is decided above: the method's own checks need not reduce again
            return wire.check(rx.kind, payload, state, sample, checked_finite=True)
        except Rejected as err:
            self.ledger.rejected.add(err, rx.sender, rx.kind)
            return None

    @staticmethod
    def _dedup_scope(record) -> tuple:
        """Sensor times are unique within a sequence; relative times only within a frame."""
        return record.key if record.timestamp_us is None else record.key[:2]

    @staticmethod
    def _clock(record, local: int, delay_us: int) -> int:
        """Sensor time of the sample's agent ``local`` in microseconds (module docstring)."""
        if record.timestamp_us is None:
            return -int(delay_us)
        return int(record.timestamp_us[local])

    def transmit(self, wire: WireFormat, batch, senders: list[int],
                 payloads: list[dict[str, torch.Tensor] | list[dict] | None],
                 state=None) -> list[Received]:
        """wire: the round's wire format (its kind, codecs and receiver check); batch: a
        CoopBatch; senders: stacked agent indices; payloads: one per sender: a dict (one
        message), a list of dicts (one message split into that many packets, each serialised
        with its own header) or None (that sender sends nothing); state: the receiving ego's,
        handed to ``wire.check``.

        Returns what arrived and passed every check, one :class:`Received` per sender; for a
        split message its ``payload`` is the list of packets that arrived and passed, in packet
        order (``packets`` their indices, ``num_packets`` how many were sent). Each
        ``Received.delay_us`` is the ego's clock minus the message's timestamp."""
        sample_of = batch.sample_of_agent().tolist()
        ego_index = batch.ego_index().tolist()
        device = batch.ego_from_agent.device
        by_sample: dict[int, list[tuple[int, dict]]] = {}
        for i, p in zip(senders, payloads):
            if p is not None:
                by_sample.setdefault(sample_of[i], []).append((i, p))
        out: list[Received] = []
        for b, items in sorted(by_sample.items()):
            record = batch.frames[b]
            ids, frame = record.agent_ids, record.key
            index_of = {ids[i - ego_index[b]]: i for i, _ in items}
            now = self._clock(record, 0, 0)
            msgs = []
            for i, p in items:
                local = i - ego_index[b]
                pose = batch.ego_from_agent[i].detach().cpu().double().numpy()
                pose[3] = (0.0, 0.0, 0.0, 1.0)
                ts = self._clock(record, local, int(batch.delay_us[i]))
                with self.timer("serialise"):
                    if isinstance(p, dict):
                        msgs.append(Message(ids[local], wire.kind, ts, pose,
                                            self._entries(wire, p)))
                    else:
                        msgs.append([Message(ids[local], wire.kind, ts, pose,
                                             self._entries(wire, q), packet=(k, len(p)))
                                     for k, q in enumerate(p)])
            arrived: dict[str, Received] = {}
            for rx in self.channel.transmit(frame, msgs, receiver=ids[0], method=wire.method,
                                            timer=self.timer, now_us=now,
                                            receiver_xyz=np.zeros(3),
                                            dedup_scope=self._dedup_scope(record)):
                with self.timer("serialise"):
                    payload = self._accepted(wire, rx, state, b, device)
                if payload is None:
                    continue
                if rx.packet is not None and rx.sender in arrived:
                    got = arrived[rx.sender]
                    if got.num_packets == rx.packet[1] and got.timestamp_us == rx.timestamp_us:
                        got.payload.append(payload)
                        got.packets.append(rx.packet[0])
                    else:  # a packet of another message than the first one: not fused with it
                        self.ledger.rejected.add(Rejected(
                            "shape", f"packet {rx.packet} does not belong to the message of "
                                     f"{got.num_packets} packets at {got.timestamp_us} us"),
                            rx.sender, rx.kind)
                    continue
                pose = torch.from_numpy(rx.world_from_lidar).to(device, batch.ego_from_agent.dtype)
                received = Received(b, index_of[rx.sender], payload, pose,
                                    now - rx.timestamp_us, rx.timestamp_us)
                if rx.packet is not None:
                    received.payload, received.packets = [payload], [rx.packet[0]]
                    received.num_packets = rx.packet[1]
                arrived[rx.sender] = received
            for r in arrived.values():
                if r.packets is not None:  # packet order, whatever order they arrived in
                    order = sorted(range(len(r.packets)), key=r.packets.__getitem__)
                    r.payload = [r.payload[k] for k in order]
                    r.packets = [r.packets[k] for k in order]
            out += arrived.values()
        return out

    def request(self, wire: WireFormat, batch, senders: list[int],
                payloads: list[dict[str, torch.Tensor] | None],
                state=None) -> dict[int, dict[str, torch.Tensor]]:
        """Send each sender its ego's request (``FusionMethod.request``): one message of ``wire.kind``
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
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in zip(senders, payloads):
            if p is None:
                continue
            b = sample_of[i]
            record = batch.frames[b]
            ids, frame = record.agent_ids, record.key
            local = i - ego_index[b]
            now = self._clock(record, 0, 0)
            with self.timer("serialise"):
                msg = Message(ids[0], wire.kind, now, np.eye(4), self._entries(wire, p))
            # The sender checks the ego's message as the ego checks its: at the same (synchronised)
            # clock, from its own position.
            receiver_xyz = batch.ego_from_agent[i, :3, 3].detach().cpu().double().numpy()
            for rx in self.channel.transmit(frame, [msg], receiver=ids[local], method=wire.method,
                                            timer=self.timer, attackable=False, now_us=now,
                                            receiver_xyz=receiver_xyz,
                                            dedup_scope=self._dedup_scope(record)):
                with self.timer("serialise"):
                    payload = self._accepted(wire, rx, state, b, device)
                if payload is not None:
                    out[i] = payload
        return out
