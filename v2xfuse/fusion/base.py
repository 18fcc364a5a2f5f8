"""The one interface every fusion method implements.

A method has a sender side and a receiver side::

    payloads = method.encode(state, senders)          # what each non-ego agent sends
    fused    = method.fuse(state, received)           # what the ego makes of what arrived

``payloads`` are dicts of named tensors; the detector turns each into a
:class:`v2xfuse.comm.Message` when a channel is attached, so what is counted is the
serialised bytes and what is fused is what the receiver decoded. Without a channel (training)
the tensors pass straight through, keeping gradients.

A method that negotiates what to send (``contract.handshake``, e.g. CodeFilling's
information-filling selection) runs two control rounds before ``encode``, each a real message
when a channel is attached (so its bytes are counted like the payload's)::

    reports  = method.report(state, senders)             # each sender -> its ego (kind "report")
    requests = method.request(state, senders, arrived)   # the ego -> each sender (kind "request")
    state.requests = {sender: what that sender received}
    payloads = method.encode(state, senders)             # may read state.requests

``None`` in place of a payload, report or request means "nothing sent" (no message, no bytes).

Every payload that arrives through a channel is first checked by the channel (bytes, sender,
pose, age, duplicates, finite values; see :mod:`v2xfuse.comm.checks`), then by the method's own
``check_payload`` (shapes on its grid and codebook, index ranges, value ranges its training
saw), which may also sanitise it (clamp features to the trained range). A payload that fails is
dropped and counted; ``fuse`` only ever sees payloads that passed. In training the detector
shows each method what its senders sent (``observe``), so it learns those ranges.

**The contract.** A method declares what it needs from the detector and where it fuses, in one
:class:`Contract` (``FusionMethod.contract``); the detector reads nothing else about it::

    contract = Contract(fuses_at=("bev",), services={"confidence"}, handshake=True)

Fusion points, walked by the detector in this order (each point is its own channel round,
counted in bytes; :attr:`FusionState.point` says which one a call is for):

* ``"points"``: before encoding: raw points are sent and ``fuse`` returns the union the ego
  encodes, (P, 5) [sample, x, y, z, intensity] in each sample's ego frame;
* ``"bev"``: every agent's BEV map is encoded; ``fuse`` returns the (B, C, H, W) map the head
  runs on;
* ``"decoder:<L>"``: inside a query head's decoder, after layer L (a head with
  ``decoder_layers``): the ego's queries are in ``state.extras["queries"]`` and ``fuse`` returns
  them updated;
* ``"detections"``: after the ego's head, at inference: the ego's own decoded detections are in
  ``state.extras["ego_detections"]`` (per sample, before NMS) and ``fuse`` returns, per sample,
  the :class:`~v2xfuse.structures.detections.Detections` that NMS turns into the output.

No point at all means the ego works alone (collaborators are not even encoded).

Services the detector computes before the first point that needs agents' maps (see
:data:`SERVICES`): ``"confidence"`` (N, 1, H, W) per-agent detection confidence in
``state.extras["confidence"]``; ``"detections"``: each sender's own detections (its frame,
after NMS, inference only unless ``detections_in_training``) in ``state.extras["detections"]``,
with the head's aleatoric uncertainty in their extras when the contract asks for
``uncertainty`` (the builder turns the head's on); ``"passes"``: ``passes`` stochastic forward
passes of the head with dropout (the head's own when it has some, else ``pass_dropout`` on
the maps), kept on for those passes only: with ``"confidence"`` the confidence maps,
``state.extras["confidence_passes"]`` (K, N, 1, H, W); with ``"detections"`` what each pass
predicts for each detected box, ``extras["pass_scores"]`` (D, K) and ``extras["pass_boxes"]``
(D, K, 7) of each sender's Detections (the epistemic uncertainty of MC dropout);
``"history"``: each agent's earlier observations encoded (``state.extras["history"]``, see
:class:`Contract`); ``"queries"``: each sender's own object queries as its query head's
decoder leaves them at every ``decoder:<L>`` point of the contract, in ``state.extras["sender_queries"]``: layer L -> stacked sender index
-> :class:`~v2xfuse.models.heads.query_decoder.Queries` of that one map (its frame).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..comm.checks import Rejected
from ..comm.received import Received
from ..comm.wire import WireFormat
from ..datasets.batch import CoopBatch
from ..structures.bev import BevGrid, warp_to_ego
from .payload_checks import expect_finite

__all__ = ["Received", "FusionState", "FusionMethod", "Contract", "SERVICES", "FUSION_POINTS",
           "Arrivals", "group_by_sample", "fuse_each_sample"]

#: where a method may fuse, in the order the detector walks them ("decoder:<L>" for any layer L)
FUSION_POINTS = ("points", "bev", "decoder", "detections")
#: what a method may ask the detector to compute for it (module docstring)
SERVICES = ("confidence", "detections", "passes", "history", "queries")


def point_order(point: str) -> tuple[int, int]:
    """Sort key of a fusion point: its place in :data:`FUSION_POINTS`, then the decoder layer."""
    name, _, layer = point.partition(":")
    return FUSION_POINTS.index(name), int(layer or 0)


@dataclass(frozen=True)
class Contract:
    """What a fusion method needs from the detector and where it fuses (module docstring).

    Attributes:
        fuses_at: fusion points, each one channel round, in walking order; () for ego only.
        services: names from :data:`SERVICES`.
        handshake: run the report/request rounds before the first point's ``encode``.
        passes: K for the ``"passes"`` service; ``pass_dropout`` its dropout probability.
        history_frames: how many earlier observations per agent the ``"history"`` service
            encodes (at most ``dataset.history_frames``).
        uncertainty: the senders' detections carry the head's aleatoric uncertainty
            (``extras["aleatoric"]``, ``extras["anchor"]``); needs ``"detections"``.
        detections_in_training: the ``"detections"`` service runs in training too (without
            gradients), for a method whose fusion depends on the senders' boxes.
        fuse_before_refine: the ``decoder:<L>`` rounds run inside layer L, between its
            attention and its refinement (the refinement sees the fused features, the next
            round the refined anchors); the ``queries`` service then gives the senders'
            queries at the same place. Without it a round runs after the whole layer.
        sender_query_layer: the decoder layer whose queries the ``queries`` service gives
            the senders for every ``decoder:<L>`` round (-1: the last); None: layer L itself.
    """

    fuses_at: tuple[str, ...] = ("bev",)
    services: frozenset[str] = frozenset()
    handshake: bool = False
    passes: int = 0
    pass_dropout: float = 0.1
    history_frames: int = 0
    uncertainty: bool = False
    detections_in_training: bool = False
    fuse_before_refine: bool = False
    sender_query_layer: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "fuses_at", tuple(self.fuses_at))
        object.__setattr__(self, "services", frozenset(self.services))
        for point in self.fuses_at:
            name, sep, layer = point.partition(":")
            if name not in FUSION_POINTS or (name == "decoder") != bool(sep) or \
                    (sep and not layer.isdigit()):
                raise ValueError(f"fusion point {point!r}: not one of 'points', 'bev', "
                                 f"'decoder:<layer>', 'detections'")
        if list(self.fuses_at) != sorted(self.fuses_at, key=point_order) or \
                len(set(self.fuses_at)) != len(self.fuses_at):
            raise ValueError(f"fusion points {self.fuses_at}: each once, in the order "
                             f"{FUSION_POINTS}")
        if "points" in self.fuses_at and len(self.fuses_at) > 1:
            raise ValueError("a method that fuses raw points fuses nowhere else")
        unknown = sorted(self.services - set(SERVICES))
        if unknown:
            raise ValueError(f"services {unknown}: not among {SERVICES}")
        if ("passes" in self.services) != (self.passes > 0):
            raise ValueError("the 'passes' service and passes > 0 go together")
        if "passes" in self.services and not self.services & {"confidence", "detections"}:
            raise ValueError("the 'passes' service samples the 'confidence' or the "
                             "'detections' service: declare one of them")
        if (self.uncertainty or self.detections_in_training) and \
                "detections" not in self.services:
            raise ValueError("uncertainty and detections_in_training are about the "
                             "'detections' service: declare it")
        if self.fuse_before_refine and not any(p.startswith("decoder:") for p in self.fuses_at):
            raise ValueError("fuse_before_refine is about decoder:<layer> points: declare one")
        if self.sender_query_layer is not None and ("queries" not in self.services or
                                                    self.fuse_before_refine):
            raise ValueError("sender_query_layer is about the 'queries' service after whole "
                             "layers: declare it, without fuse_before_refine")
        if ("history" in self.services) != (self.history_frames > 0):
            raise ValueError("the 'history' service and history_frames > 0 go together")


@dataclass
class FusionState:
    """What the detector hands a fusion method for one batch.

    Attributes:
        batch: the input batch.
        features: (N, C, H, W) every agent's BEV features in its own frame (intermediate), or
            None before encoding (early).
        grid: the grid of ``features``.
        extras: method-specific per-agent maps the detector computed (e.g. ``"confidence"``:
            (N, 1, H, W) from a per-agent head).
        requests: handshake methods only: stacked sender index -> the request payload that
            sender received from its ego (absent: no request arrived).
        point: the fusion point the current ``encode``/``fuse`` call is for.
        sensors: the S sensors the detector's encoder reads, in its order (``lidar``, ``camera``).
        modality_mask: (N, S) bool, which of ``sensors`` each agent had data for (a
            camera-only roadside unit: ``[False, True]``; its map holds its camera's features
            only, see :mod:`v2xfuse.models.encoders.fuser`); None outside the detector.
    """

    batch: CoopBatch
    features: torch.Tensor | None
    grid: BevGrid | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    requests: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    point: str = "bev"
    #: the detector's NMS, ``nms(Detections) -> Detections`` (for methods fusing detections)
    nms: Callable | None = None
    sensors: tuple[str, ...] = ()
    modality_mask: torch.Tensor | None = None

    def has(self, sensor: str) -> torch.Tensor:
        """(N,) bool: which agents had data of ``sensor`` (all False for a sensor the encoder
        does not read)."""
        if self.modality_mask is None:
            raise ValueError("the detector sets FusionState.modality_mask; this state has none")
        if sensor not in self.sensors:
            return self.modality_mask.new_zeros(len(self.modality_mask))
        return self.modality_mask[:, self.sensors.index(sensor)]


class FusionMethod(nn.Module):
    #: what the method needs and where it fuses (module docstring)
    contract = Contract()
    message_kind = "features"
    #: payload name -> codec name (see v2xfuse.comm.codecs) of every array the method sends;
    #: the channel serialises with these (:meth:`wire`) and refuses an array without one.
    codecs: dict[str, str] = {}
    #: payload name -> keyword arguments of its codec, over the channel's per-codec defaults
    #: (e.g. ``{"codes": {"bits": 6}}`` for a 64-entry codebook)
    codec_kwargs: dict[str, dict] = {}

    def kind_at(self, point: str) -> str:
        """The kind of the messages sent at fusion point ``point``: ``message_kind`` for a method
        that fuses at one point, ``"<message_kind>@<point>"`` for one that fuses at several."""
        return self.message_kind if len(self.contract.fuses_at) <= 1 else \
            f"{self.message_kind}@{point}"

    def reset(self) -> None:
        """Forget anything kept across frames (evaluation calls it before a new pass)."""

    def wire(self, kind: str | None = None) -> WireFormat:
        """How messages of ``kind`` (default ``message_kind``) go on the wire: this method's
        codecs and its receiver-side :meth:`check_payload`."""
        return WireFormat(type(self).__name__, kind or self.message_kind, dict(self.codecs),
                          dict(self.codec_kwargs), self.check_payload)

    def senders(self, batch: CoopBatch) -> list[int]:
        """Stacked indices of the agents that send (every non-ego agent by default)."""
        ego = set(batch.ego_index().tolist())
        return [i for i in range(batch.num_agents) if i not in ego]

    def report(self, state: FusionState,
               senders: list[int]) -> list[dict[str, torch.Tensor] | None]:
        """Handshake round 1: what each sender tells its ego before the ego asks (aligned with
        ``senders``; None: nothing)."""
        return [None] * len(senders)

    def request(self, state: FusionState, senders: list[int],
                reports: list[Received]) -> list[dict[str, torch.Tensor] | None]:
        """Handshake round 2, on the ego's side: what the ego asks of each sender, given the
        reports that arrived (aligned with ``senders``; None: nothing asked)."""
        return [None] * len(senders)

    def encode(self, state: FusionState,
               senders: list[int]) -> list[dict[str, torch.Tensor] | None]:
        raise NotImplementedError

    def fuse(self, state: FusionState, received: list[Received]):
        raise NotImplementedError

    def check_payload(self, kind: str, payload: dict[str, torch.Tensor],
                      state: FusionState | None, sample: int = 0,
                      checked_finite: bool = False) -> dict[str, torch.Tensor]:
        """Receiver side, before ``fuse`` (or before a sender reads a request): raise
        :class:`~v2xfuse.comm.checks.Rejected` for a ``kind`` message whose decoded ``payload``
        must not be used; return the payload to use (possibly sanitised). ``state``: the
        receiver's state for this batch (None for the ego's pose message, which must be
        empty); ``sample``: which of its samples the message is for; ``checked_finite``: the
        caller already refused NaN and inf (the channel does, in the same pass as its bound). Arrays the method does not name in ``codecs`` are refused; the method's own
        ``check_fields`` does the rest."""
        if kind == "pose":
            if payload:
                raise Rejected("shape", f"a pose message carries no payload, got {sorted(payload)}")
            return payload
        unexpected = sorted(set(payload) - set(self.codecs))
        if unexpected:
            raise Rejected("shape", f"payload arrays {unexpected} are not among {sorted(self.codecs)}")
        if not checked_finite:
            for name, t in payload.items():
                expect_finite(name, t)
        return self.check_fields(kind, payload, state, sample)

    def check_fields(self, kind: str, payload: dict[str, torch.Tensor],
                     state: FusionState, sample: int = 0) -> dict[str, torch.Tensor]:
        """What ``check_payload`` adds for this method: the arrays it expects, their shapes on
        its grid and codebook, index and value ranges (helpers in
        :mod:`v2xfuse.fusion.payload_checks`). Default: accept."""
        return payload

    def observe(self, senders: list[int], payloads: list[dict[str, torch.Tensor] | None]
                ) -> None:
        """Training: what the senders put in their messages this step, for the ranges that
        ``check_payload`` holds received payloads to. Default: nothing kept."""

    def aux_loss(self, state: FusionState) -> dict[str, torch.Tensor]:
        """Extra training losses of the method (e.g. a codebook's reconstruction loss)."""
        return {}


def group_by_sample(received: list[Received]) -> dict[int, list[Received]]:
    """Sample index -> the messages that arrived for that sample's ego, in arrival order."""
    out: dict[int, list[Received]] = defaultdict(list)
    for r in received:
        out[r.sample].append(r)
    return out


@dataclass
class Arrivals:
    """What arrived for one sample's ego, as a map-fusing method needs it.

    Attributes:
        sample: the sample index.
        ego: (C, H, W) the ego's own map.
        messages: the L >= 1 messages that arrived for it.
        ego_from_sender: (L, 4, 4) their poses, in ``ego``'s dtype.
        grid: the grid of ``ego`` and of the senders' maps.
    """

    sample: int
    ego: torch.Tensor
    messages: list[Received]
    ego_from_sender: torch.Tensor
    grid: BevGrid

    def stacked(self, name: str) -> torch.Tensor:
        """(L, ...) payload array ``name`` of every message, in ``ego``'s dtype."""
        return torch.stack([m.payload[name].to(self.ego.dtype) for m in self.messages])

    def warped(self, maps: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(L, C', H, W) senders' maps in their own frames -> the same on the ego's grid."""
        return warp_to_ego(maps, self.ego_from_sender, self.grid, mode)


def fuse_each_sample(state: FusionState, received: list[Received],
                     fuse_one: Callable[[Arrivals], torch.Tensor]) -> torch.Tensor:
    """The loop every map-fusing method shares: group what arrived by sample, and per sample
    either keep the ego's map (nothing arrived) or ``fuse_one`` it with what arrived.

    Returns:
        (B, C, H, W) one fused map per sample, in the ego's frame.
    """
    ego = state.features[state.batch.ego_index()]
    groups = group_by_sample(received)
    out = []
    for b in range(len(ego)):
        msgs = groups.get(b)
        if not msgs:
            out.append(ego[b])
            continue
        poses = torch.stack([m.ego_from_sender.to(ego.dtype) for m in msgs])
        out.append(fuse_one(Arrivals(b, ego[b], msgs, poses, state.grid)))
    return torch.stack(out)
