"""One cooperative detector; the fusion method is a plug-in chosen by config.

    points of every agent -> encoder -> BEV backbone -> [services] -> at each fusion point the
    method declares: (senders) encode -> channel round -> (ego) fuse -> head -> decode -> NMS

The detector reads one thing about the method, its :class:`~v2xfuse.fusion.base.Contract`:
the points where it fuses (``points`` before encoding, ``bev`` before the head,
``decoder:<L>`` inside a query head, ``detections`` after it) and the services it needs
(per-agent confidence, per-agent detections, stochastic passes, history, the senders'
queries). It walks the points in order; it never branches on a method's name.

A head that samples the cameras' image features (``reads_images``: the query head's camera
mode) gets, with every map it is given, the cameras of that map's agent: the encoder puts its
image backbone's output in an :class:`~.inputs.ImageFeatureSink` while it encodes the agents
(computed once), kept in ``state.extras["camera_features"]`` (agents numbered as in the batch)
and renumbered for each call (:meth:`~.inputs.CameraFeatures.of_agents`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.batch import CoopBatch
from ..comm.received import Received
from ..fusion.base import FusionMethod, FusionState
from ..structures.boxes import transform_boxes
from ..structures.detections import Detections
from ..utils.precision import full_precision
from ..utils.timing import null_timer
from ..structures.bev import BevGrid
from .encoders.fuser import modality_mask, sensors_of
from .heads.base import Head, OutsideGrid
from .inputs import AgentInputs, AuxLosses, CameraFeatures, ImageFeatureSink

__all__ = ["CoopDetector", "DetectorOutput", "Detections", "run_handshake", "ego_aligned_frames",
           "SENDER_FRAMES"]

SENDER_FRAMES = ("own", "ego_aligned")


@dataclass
class DetectorOutput:
    """What one forward pass produced.

    Attributes:
        head: the head's output on the fused (B, C, H, W) maps (or the ego's own).
        state: what the fusion method saw (features, services, requests).
        rounds: fusion point -> the messages that arrived in that point's round.
        detections: a method fusing at ``detections``: per sample, the boxes before NMS
            (``predict`` only runs NMS on them); None otherwise.
        encoder_losses: training: the auxiliary losses the encoders added while encoding the
            agents' current observations (name -> weighted scalar, e.g. the camera encoder's
            ``loss_depth``; see :class:`~.inputs.AuxLosses`), which :meth:`CoopDetector.loss`
            adds; empty in evaluation.
    """

    head: object  # the head's output (its own dataclass, see heads.base.Head)
    state: FusionState
    rounds: dict[str, list[Received]] = field(default_factory=dict)
    detections: list[Detections] | None = None
    encoder_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def received(self) -> list[Received]:
        """Every message that arrived, over all rounds."""
        return [r for arrived in self.rounds.values() for r in arrived]


class CoopDetector(nn.Module):
    """
    Args:
        encoder: :class:`AgentInputs` of N agents -> (N, C, H, W) BEV maps.
        backbone: (N, C, H, W) -> (N, C', H', W'); one with ``sparse_input`` (the sparse
            backbone) reads ``encoder.pillars(inputs)`` instead.
        fusion: the fusion method.
        head: detection head on the fused (B, C', H', W') maps.
        nms_iou, score_threshold, max_detections: post-processing.
        agent_loss_weight: weight of the single-agent auxiliary loss: the same head on every
            agent's own BEV map, against the ground truth moved into that agent's frame
            (where the agent's map reaches outside the ego's ground-truth range nothing is
            taught as background, since the labels there are incomplete: the head applies
            :class:`~.heads.base.OutsideGrid` to its own locations). It gives the shared
            encoder every agent's view as supervision each step; 0 disables it. Ignored for
            early fusion.
        agent_head: None: the agents' own detections (the ``detections`` service) and the
            single-agent loss use ``head``; a second head of the same kind: they use it and
            ``head`` learns on fused maps only (CoDynTrust's reference pre-trains a
            single-agent detector for its senders' boxes: a head shared with the fused maps
            has to serve two feature distributions).
        sender_frame: the frame a sender of intermediate features encodes its points in.
            ``"own"``: its LiDAR frame (OpenCOOD's ``proj_first: false``); the ego rotates and
            shifts the map it receives. ``"ego_aligned"``: the ego's axes and LiDAR height,
            centred on the sender's own position snapped to the feature grid (see
            :func:`ego_aligned_frames`), so the ego only shifts the map by whole cells: the same
            features wherever a collaborator faces, and no resampling blur. The sender needs the
            ego's pose for it; the ego sends it as a header-only message of kind ``"pose"``
            (counted), and a sender whose pose message is lost falls back to its own frame.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, fusion: FusionMethod, head: Head,
                 nms_iou: float = 0.15, score_threshold: float = 0.1, max_detections: int = 100,
                 agent_loss_weight: float = 0.0, sender_frame: str = "own",
                 agent_head: Head | None = None):
        super().__init__()
        if sender_frame not in SENDER_FRAMES:
            raise ValueError(f"model.sender_frame: {sender_frame!r} is not one of {SENDER_FRAMES}")
        self.encoder, self.backbone, self.fusion, self.head = encoder, backbone, fusion, head
        self.own_head = agent_head  # a module only when separate (so its weights are saved)
        self.nms_iou, self.score_threshold, self.max_detections = nms_iou, score_threshold, max_detections
        self.agent_loss_weight = float(agent_loss_weight)
        self.sender_frame = sender_frame
        self.feature_grid: BevGrid = encoder.grid.scaled(backbone.out_stride)
        self._check_contract()

    def _check_contract(self) -> None:
        """Refuse, at build time, a method whose contract this detector cannot serve."""
        contract = self.fusion.contract
        decoder = [p for p in contract.fuses_at if p.startswith("decoder:")]
        layers = getattr(self.head, "decoder_layers", 0)
        for point in decoder:
            if int(point.split(":")[1]) >= layers:
                raise ValueError(f"{type(self.fusion).__name__} fuses at {point!r}: the "
                                 f"{type(self.head).__name__} head has {layers} decoder layers")
        if "queries" in contract.services and not (decoder and hasattr(self.head,
                                                                      "queries_after")):
            raise ValueError(f"{type(self.fusion).__name__} needs the senders' queries at a "
                             f"decoder point; {type(self.head).__name__} has none to give")
        sent = contract.sender_query_layer
        if sent is not None and not -layers <= sent < layers:
            raise ValueError(f"{type(self.fusion).__name__} sends the senders' queries of "
                             f"decoder layer {sent}: the {type(self.head).__name__} head has "
                             f"{layers} decoder layers")
        services = contract.services
        if {"passes", "confidence"} <= services and not hasattr(self.head, "confidence"):
            raise ValueError(f"{type(self.fusion).__name__} needs stochastic passes of the "
                             f"head's confidence; {type(self.head).__name__} has none")
        if {"passes", "detections"} <= services and not hasattr(self.agent_head, "decode_at"):
            raise ValueError(f"{type(self.fusion).__name__} needs stochastic passes at its "
                             f"senders' boxes; {type(self.agent_head).__name__} cannot decode at "
                             f"given anchors (decode_at)")
        if contract.uncertainty and not getattr(self.agent_head, "uncertainty", False):
            raise ValueError(f"{type(self.fusion).__name__} needs detections with uncertainty; "
                             f"the {type(self.agent_head).__name__} head does not predict it "
                             f"(model.head.anchor.uncertainty)")

    def bev(self, inputs: AgentInputs) -> torch.Tensor:
        """(N, C', H', W') feature maps of the N agents of ``inputs``. A backbone with
        ``sparse_input`` reads the encoder's occupied cells (``encoder.pillars``) instead of
        its dense maps."""
        if getattr(self.backbone, "sparse_input", False):
            return self.backbone(self.encoder.pillars(inputs))
        return self.backbone(self.encoder(inputs))

    def modality_mask(self, batch: CoopBatch) -> torch.Tensor:
        """(N, S) bool: which of the encoder's S sensors (``encoders.fuser.sensors_of``) each
        of the batch's N agents has data for; an agent without one still has a map."""
        return modality_mask(self.encoder, AgentInputs.from_batch(batch))

    def forward(self, batch: CoopBatch, channel=None, timer=None) -> DetectorOutput:
        """``channel``: None (tensors pass straight through), or an object with
        ``transmit(wire, batch, senders, payloads) -> list[Received]`` that serialises,
        counts and perturbs the messages (see v2xfuse.comm; ``wire``: the method's
        :class:`~v2xfuse.comm.wire.WireFormat` for the round); for a handshake method also
        ``request(wire, ...)`` (see :func:`run_handshake`), used with
        ``sender_frame="ego_aligned"`` for the ego's pose too.

        ``timer``: optional ``timer(stage) -> context manager`` (see v2xfuse.utils.timing) around
        the stages "encode" (encoder, backbone, services, what senders compute for their
        messages), "channel", "fuse" and "head"."""
        fusion = self.fusion
        points = fusion.contract.fuses_at
        stage = timer or null_timer
        senders = fusion.senders(batch)
        # only maps are sent in the sender's frame: raw points and boxes are moved by the ego
        if self.sender_frame == "ego_aligned" and any(p == "bev" or p.startswith("decoder:")
                                                      for p in points):
            batch = self._ego_aligned(batch, senders, channel, stage)
        state = FusionState(batch, None, None, nms=self._nms, sensors=sensors_of(self.encoder),
                            modality_mask=self.modality_mask(batch))
        rounds: dict[str, list[Received]] = {}
        # a fresh sink per pass: what the encoders add travels in the output, never as state
        aux = AuxLosses() if self.training else None
        if "points" in points:
            cloud = self._round("points", state, senders, channel, stage, rounds)
            with stage("encode"):
                sink = self._image_sink()
                fused = self.bev(AgentInputs.early(batch, cloud, sink))
            # one map per sample, its cameras already numbered by sample
            images = {"cameras": sink.cameras} if sink is not None else {}
        else:
            with stage("encode"):
                self._encode_agents(state, senders, aux)
                self._services(state, senders)
            ego = state.features[batch.ego_index()]
            images = self._images_of(state, batch.ego_index())
            fused = self._round("bev", state, senders, channel, stage, rounds) \
                if "bev" in points else ego
        hooks = {int(p.split(":")[1]): self._decoder_hook(p, state, senders, channel, stage,
                                                           rounds)
                 for p in points if p.startswith("decoder:")}
        with stage("head"):
            # only a head that fuses inside its layers is asked to (a contract's flag)
            inside = {"before_refine": True} if fusion.contract.fuse_before_refine else {}
            head = self.head(fused, hooks=hooks, **inside, **images) if hooks \
                else self.head(fused, **images)
        out = DetectorOutput(head, state, rounds, encoder_losses=aux.terms if aux else {})
        if "detections" in points and not self.training:
            with stage("head"):
                state.extras["ego_detections"] = [
                    self.head.decode(head, b, self.score_threshold)
                    for b in range(batch.batch_size)]
            out.detections = self._round("detections", state, senders, channel, stage, rounds)
        return out

    def _round(self, point: str, state: FusionState, senders: list[int], channel, stage,
               rounds: dict[str, list[Received]]):
        """One fusion point: (handshake before the first,) the senders' payloads, one channel
        round (or straight through), the ego's fusion. Returns what ``fuse`` made."""
        fusion, batch = self.fusion, state.batch
        state.point = point
        with stage("encode"):
            if fusion.contract.handshake and senders and point == fusion.contract.fuses_at[0]:
                run_handshake(fusion, state, senders, channel)
            payloads = fusion.encode(state, senders) if senders else []
            if self.training and senders:
                fusion.observe(senders, payloads)
        with stage("channel"):
            received = (channel.transmit(fusion.wire(fusion.kind_at(point)), batch, senders,
                                         payloads, state=state)
                        if channel is not None else self.direct(batch, senders, payloads))
        rounds[point] = received
        with stage("fuse"):
            return fusion.fuse(state, received)

    def _decoder_hook(self, point, state, senders, channel, stage, rounds):
        """``hook(queries) -> queries`` the head calls after its decoder layer: the ego's
        queries go in ``state.extras["queries"]`` for the method's round at ``point``."""
        def hook(queries):
            state.extras["queries"] = queries
            return self._round(point, state, senders, channel, stage, rounds)
        return hook

    def _ego_aligned(self, batch: CoopBatch, senders: list[int], channel, stage) -> CoopBatch:
        """The batch with every sender that knows the ego's pose in its ego-aligned frame; the
        ego's pose message is timed as "channel", the senders' point transform as "encode"."""
        if channel is not None and senders:  # the ego's pose must reach each sender first
            with stage("channel"):
                arrived = channel.request(self.fusion.wire("pose"), batch, senders,
                                          [{}] * len(senders))
            senders = [i for i in senders if i in arrived]
        with stage("encode"):
            return ego_aligned_frames(batch, senders, self.feature_grid.cell)

    def _encode_agents(self, state: FusionState, senders: list[int],
                       aux: AuxLosses | None = None) -> None:
        """Every agent's BEV map into ``state.features``; only the egos' when nobody sends
        and no loss needs the others (their maps stay zero). ``aux``: the sink for the
        encoders' auxiliary losses (training), or None."""
        batch = state.batch
        sink = self._image_sink()
        inputs = AgentInputs.from_batch(batch, aux, sink)
        if not (senders or (self.training and self.agent_loss_weight > 0)):
            inputs = inputs.only(batch.ego_index())
        state.features = self.bev(inputs)
        state.grid = self.feature_grid
        if sink is not None:
            state.extras["camera_features"] = sink.cameras

    def _image_sink(self) -> ImageFeatureSink | None:
        """A sink for the camera encoder's image features when the head reads them."""
        return ImageFeatureSink() if getattr(self.head, "reads_images", False) else None

    def _images_of(self, state: FusionState, agents=None,
                   key: str = "camera_features") -> dict:
        """The head's keyword for maps ``features[agents]`` (None: every agent's map): the
        cameras of those agents when the head reads images, else nothing."""
        if not getattr(self.head, "reads_images", False):
            return {}
        cameras: CameraFeatures | None = state.extras.get(key)
        if cameras is not None and agents is not None:
            cameras = cameras.of_agents(agents)
        return {"cameras": cameras}

    def _services(self, state: FusionState, senders: list[int]) -> None:
        """What the method's contract asks the detector to compute (see v2xfuse.fusion.base)."""
        contract = self.fusion.contract
        features = state.features
        if "confidence" in contract.services:
            state.extras["confidence"] = self.head.confidence(features)
        if {"passes", "confidence"} <= contract.services:
            with torch.no_grad():
                state.extras["confidence_passes"] = torch.stack([
                    self.head.confidence(F.dropout(features, contract.pass_dropout, True))
                    for _ in range(contract.passes)])
        if "detections" in contract.services and senders and self._detecting():
            state.extras["detections"] = self.detect_agents(features, senders, self._passes(),
                                                            **self._images_of(state))
        if "history" in contract.services:
            self._history(state, senders)
        if "queries" in contract.services and senders:
            layers = [int(p.split(":")[1]) for p in contract.fuses_at if p.startswith("decoder:")]
            inside = {"before_refine": True} if contract.fuse_before_refine else {}
            sent = contract.sender_query_layer
            if sent is not None and sent < 0:
                sent += self.head.decoder_layers
            # fusion layer -> the layer whose queries the senders send in that round
            source = {layer: layer if sent is None else sent for layer in layers}
            per_layer = self.head.queries_after(features[senders], source.values(), **inside,
                                                **self._images_of(state, senders))
            state.extras["sender_queries"] = {
                layer: {i: per_layer[source[layer]].rows(slice(k, k + 1))
                        for k, i in enumerate(senders)}
                for layer in layers}

    def _history(self, state: FusionState, senders: list[int]) -> None:
        """The ``history`` service: each agent's ``contract.history_frames`` newest earlier
        observations encoded into ``state.extras["history"]`` (H, C, H', W'), each in its own
        frame (``batch.history`` says whose, when and where: ``agent_from_past``), and with
        the ``detections`` service, where it runs (inference; training too with
        ``detections_in_training``), the senders' detections on theirs in
        ``state.extras["history_detections"]``: observation index -> Detections (its frame).

        Nothing is encoded where nothing would read it: no method reads the maps themselves, so
        in training without the detections service (late_tc) the history is not encoded; it
        was, and every agent's earlier view, the roadside unit's too, entered the batch-norm
        statistics of a model supervised on the ego's current view only. CoDynTrust detects in
        training (its velocities come from the history detections), so it still encodes them."""
        contract, batch = self.fusion.contract, state.batch
        detecting = "detections" in contract.services and self._detecting()
        if self.training and not detecting:
            return
        history = batch.history
        if history is None:
            raise ValueError(f"{type(self.fusion).__name__} needs each agent's earlier "
                             f"observations: set dataset.history_frames >= "
                             f"{contract.history_frames}")
        used = torch.nonzero(history.steps <= contract.history_frames).squeeze(1)
        sink = self._image_sink()
        inputs = replace(AgentInputs.of_history(batch).only(used), image_features=sink)
        state.extras["history"] = maps = self.bev(inputs)
        if sink is not None:
            state.extras["history_camera_features"] = sink.cameras
        if detecting:
            sending = set(senders)
            wanted = [h for h in used.tolist() if int(history.agent[h]) in sending]
            dets = self.detect_agents(maps, wanted, self._passes(), **self._images_of(
                state, key="history_camera_features")) if wanted else []
            state.extras["history_detections"] = dict(zip(wanted, dets))

    def _detecting(self) -> bool:
        """Whether the ``detections`` service runs in this mode (see Contract)."""
        return not self.training or self.fusion.contract.detections_in_training

    def _passes(self) -> int:
        """K stochastic passes at each detected box when the contract asks for them."""
        contract = self.fusion.contract
        return contract.passes if "passes" in contract.services else 0

    @torch.no_grad()
    def detect_agents(self, features: torch.Tensor, agents: list[int],
                      passes: int = 0, cameras: CameraFeatures | None = None) -> list[Detections]:
        """Each listed agent's own detections (its frame) from its own map, after NMS.
        ``cameras``: a head that reads images: every agent's cameras (numbered as
        ``features``).

        ``passes`` > 0: Monte Carlo dropout, that many more passes of the head with dropout on
        (the head's own, ``mc=True``, when it has some; else ``contract.pass_dropout`` on the
        maps), the dropout off again afterwards; each box gets what every pass predicts at its
        anchor: ``extras["pass_scores"]`` (D, K) and ``extras["pass_boxes"]`` (D, K, 7)."""
        maps, head = features[agents], self.agent_head
        images = {"cameras": None if cameras is None else cameras.of_agents(agents)} \
            if getattr(head, "reads_images", False) else {}
        out = head(maps, **images)
        dets = [self._nms(head.decode(out, k, self.score_threshold)) for k in range(len(agents))]
        if passes <= 0:
            return dets
        if any("anchor" not in d.extras for d in dets):
            raise ValueError(f"stochastic passes at the boxes need the anchor of each box: "
                             f"{type(head).__name__}.decode gives none (uncertainty off)")
        if getattr(head, "dropout", 0.0) > 0:
            runs = [head(maps, mc=True) for _ in range(passes)]
        else:
            p = self.fusion.contract.pass_dropout
            runs = [head(F.dropout2d(maps, p, training=True), **images)
                    for _ in range(passes)]
        for k, d in enumerate(dets):
            at = [head.decode_at(run, k, d.extras["anchor"]) for run in runs]
            d.extras["pass_scores"] = torch.stack([s for s, _ in at], 1)
            d.extras["pass_boxes"] = torch.stack([b for _, b in at], 1)
        return dets

    @property
    def agent_head(self) -> Head:
        """The head of the agents' own detections and of the single-agent loss."""
        return self.head if self.own_head is None else self.own_head

    def _nms(self, dets: Detections) -> Detections:
        """Rotated NMS over all labels together, best ``max_detections`` kept; every field
        (labels, extras) follows its box."""
        from ..ops import nms_rotated

        return dets.select(nms_rotated(dets.boxes, dets.scores, self.nms_iou)[: self.max_detections])

    @staticmethod
    def direct(batch: CoopBatch, senders: list[int], payloads) -> list[Received]:
        """Deliver payloads without serialisation (training): poses from the batch."""
        sample = batch.sample_of_agent()
        return [Received(int(sample[i]), i, p, batch.ego_from_agent[i], int(batch.delay_us[i]))
                for i, p in zip(senders, payloads) if p is not None]

    def loss(self, out: DetectorOutput, batch: CoopBatch) -> dict[str, torch.Tensor]:
        losses = self.head.loss(out.head, batch.gt_boxes)
        if self.agent_loss_weight > 0 and out.state.features is not None:
            agent = self.agent_loss(out.state.features, out.state.batch,
                                    **self._images_of(out.state))
            losses["loss"] = losses["loss"] + self.agent_loss_weight * agent["loss"]
            losses["loss_agent"] = agent["loss"].detach()
        for k, v in out.encoder_losses.items():  # already weighted by their encoders
            losses["loss"] = losses["loss"] + v
            losses[k] = v.detach()
        for k, v in self.fusion.aux_loss(out.state).items():
            losses["loss"] = losses["loss"] + v
            losses[k] = v.detach()
        return losses

    def agent_loss(self, features: torch.Tensor, batch: CoopBatch,
                   cameras: CameraFeatures | None = None) -> dict[str, torch.Tensor]:
        """The head's loss on every agent's own (N, C, H, W) map, in that agent's frame;
        ``cameras``: every agent's, for a head that reads images."""
        poses = batch.true_ego_from_agent if batch.true_ego_from_agent is not None \
            else batch.ego_from_agent
        sample = batch.sample_of_agent().tolist()
        gts, ignore = [], []
        for i, b in enumerate(sample):
            ego_from_agent = poses[i].to(torch.float64)
            agent_from_ego = torch.linalg.inv(ego_from_agent).to(features.dtype)
            gts.append(transform_boxes(agent_from_ego, batch.gt_boxes[b]))
            ignore.append(OutsideGrid(ego_from_agent, self.agent_head.grid))
        head = self.agent_head
        images = {"cameras": cameras} if getattr(head, "reads_images", False) else {}
        return head.loss(head(features, **images), gts, ignore)

    @torch.no_grad()
    def predict(self, out: DetectorOutput, timer=None) -> list[Detections]:
        """Final boxes per sample in the ego frame: decode (or take what a method fusing at
        ``detections`` made of them), then NMS. ``timer``: as in :meth:`forward`, stages
        "head" (decoding) and "nms"."""
        stage = timer or null_timer
        dets = []
        for b in range(out.head.batch_size):
            if out.detections is not None:
                own = out.detections[b]
            else:
                with stage("head"):
                    own = self.head.decode(out.head, b, self.score_threshold)
            with stage("nms"):
                dets.append(self._nms(own))
        return dets


def run_handshake(fusion: FusionMethod, state: FusionState, senders: list[int],
                  channel=None) -> None:
    """The control rounds of a method with ``handshake`` (see v2xfuse.fusion.base): each sender's
    report to its ego, then the ego's request to each sender; fills ``state.requests``.

    With a channel both rounds are real messages (``channel.transmit`` of kind ``"report"``,
    ``channel.request`` of kind ``"request"``), counted and perturbed like the payload; without
    one (training) the tensors pass straight through.
    """
    batch = state.batch
    reports = fusion.report(state, senders)
    if channel is None:
        asks = fusion.request(state, senders, CoopDetector.direct(batch, senders, reports))
        state.requests = {i: a for i, a in zip(senders, asks) if a is not None}
    else:
        arrived = channel.transmit(fusion.wire("report"), batch, senders, reports, state=state)
        state.requests = channel.request(fusion.wire("request"), batch, senders,
                                         fusion.request(state, senders, arrived), state=state)


@full_precision
def ego_aligned_frames(batch: CoopBatch, agents: list[int], cell: float) -> CoopBatch:
    """Re-express the listed agents' points in frames with the ego's axes.

    Agent ``i``'s new frame has the ego's orientation and its origin at the agent's own position
    with x and y rounded to multiples of ``cell`` and z at the ego's LiDAR height, so
    ``ego_from_new`` is a pure shift by whole cells: ``points' = A p`` with
    ``A = [R | t - s]`` for ``ego_from_agent = [R | t]`` and the snapped shift ``s``, and every
    pose (received and true) becomes ``pose @ inv(A)``. Works with whichever pose the ego sent
    and the sender believes (``ego_from_agent``, noisy or not); the true poses follow the same
    ``A`` so supervision stays exact. The agents' cameras move with their frames
    (``lidar_from_camera' = A @ lidar_from_camera``), so a point still projects onto its pixel,
    and so do their older observations (``agent_from_past' = A @ agent_from_past``; the older
    points and cameras stay in their own frames).
    """
    if not agents:
        return batch
    pose = batch.ego_from_agent
    dtype = pose.dtype
    a = torch.eye(4, dtype=torch.float64, device=pose.device).repeat(len(pose), 1, 1)
    idx = torch.as_tensor(agents, dtype=torch.long, device=pose.device)
    p = pose[idx].to(torch.float64)
    shift = p[:, :3, 3].clone()
    shift[:, :2] = torch.round(shift[:, :2] / cell) * cell
    shift[:, 2] = 0.0
    a[idx, :3, :3] = p[:, :3, :3]
    a[idx, :3, 3] = p[:, :3, 3] - shift
    a_inv = torch.linalg.inv(a)
    points = _move_agents_points(batch.points, a, agents)
    true_pose = batch.true_ego_from_agent
    if true_pose is not None:
        true_pose = (true_pose.to(torch.float64) @ a_inv).to(true_pose.dtype)
    cameras = batch.cameras
    if cameras is not None:
        cameras = replace(cameras, lidar_from_camera=(a[cameras.agent] @ cameras.lidar_from_camera
                                                      .to(torch.float64)).to(cameras.lidar_from_camera.dtype))
    history = batch.history
    if history is not None:
        history = replace(history, agent_from_past=a[history.agent] @ history.agent_from_past)
    return replace(batch, points=points, ego_from_agent=(pose.to(torch.float64) @ a_inv).to(dtype),
                   true_ego_from_agent=true_pose, cameras=cameras, history=history)


def _move_agents_points(points: torch.Tensor, agent_from_old: torch.Tensor,
                        agents: list[int]) -> torch.Tensor:
    """points (P, 5) [agent, x, y, z, intensity] with the listed agents' xyz moved by their
    ``agent_from_old`` (N, 4, 4) (the others unchanged) -> a new (P, 5) tensor.

    One 3x3 rotation and a translation per agent rather than a gathered 4x4 per point: the
    per-point matrices cost 5-7 ms a frame on the OPV2V grid."""
    out = points.clone()
    agent = points[:, 0].long()
    rot = agent_from_old[:, :3, :3].to(points.dtype)
    trans = agent_from_old[:, :3, 3].to(points.dtype)
    for i in agents:
        rows = torch.nonzero(agent == i).squeeze(1)
        if len(rows):
            out[rows, 1:4] = torch.addmm(trans[i], points[rows, 1:4], rot[i].T)
    return out
