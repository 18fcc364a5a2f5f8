"""Fusion contracts: what a method declares is all the detector reads; every fusion point is
its own channel round, counted in bytes."""
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel
from v2xfuse.fusion.base import Contract, FusionMethod
from v2xfuse.fusion.basic import MaxFusion
from v2xfuse.models.detector import CoopDetector, Detections
from v2xfuse.structures.transforms import pose_from_xyz_rpy


def _poses(n=3):
    return [pose_from_xyz_rpy(3.0 * i, -2.0 * i, 0.0, 0.0, 0.0, 0.3 * i) for i in range(n)]


@pytest.mark.parametrize("kwargs, match", [
    ({"fuses_at": ("bev", "points")}, "order"),
    ({"fuses_at": ("neck",)}, "not one of"),
    ({"fuses_at": ("decoder",)}, "not one of"),
    ({"fuses_at": ("points", "detections")}, "fuses nowhere else"),
    ({"services": {"gossip"}}, "not among"),
    ({"services": {"passes"}}, "passes"),
])
def test_a_contract_the_detector_cannot_walk_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Contract(**kwargs)


class MapsThenBoxes(MaxFusion):
    """Fuses at two points: F-Cooper on the maps, then the senders' own boxes appended to the
    ego's (as late fusion) after the head."""

    contract = Contract(fuses_at=("bev", "detections"), services={"detections"})
    codecs = {"features": "float16", "boxes": "raw", "scores": "raw"}

    def encode(self, state, senders):
        if state.point == "bev":
            return super().encode(state, senders)
        return [{"boxes": d.boxes.float(), "scores": d.scores.float()}
                for d in state.extras["detections"]]

    def check_fields(self, kind, payload, state, sample=0):
        return payload if "boxes" in payload else super().check_fields(kind, payload, state,
                                                                       sample)

    def fuse(self, state, received):
        if state.point == "bev":
            return super().fuse(state, received)
        out = list(state.extras["ego_detections"])
        for r in received:  # identity poses below: boxes need no move
            own = out[r.sample]
            out[r.sample] = Detections(torch.cat([own.boxes, r.payload["boxes"]]),
                                       torch.cat([own.scores, r.payload["scores"]]))
        return out


def test_each_fusion_point_is_its_own_round_counted_in_bytes(tiny_detector_cfg,
                                                            random_points_batch):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg("max")).eval()
    model.fusion = MapsThenBoxes(channels=8)
    batch = random_points_batch([pose_from_xyz_rpy(0, 0, 0, 0, 0, 0)] * 3)
    link = BatchChannel(Channel(0))
    with torch.no_grad():
        out = model(batch, channel=link)
        final = model.predict(out)[0]
    assert list(out.rounds) == ["bev", "detections"]
    assert [r.sender for r in out.rounds["bev"]] == [1, 2]
    kinds = link.ledger.per_kind()
    assert set(kinds) == {"features@bev", "features@detections"}
    # each map (8 x 32 x 32 float16) is counted once per sender, in the bev round
    assert kinds["features@bev"] > 2 * 8 * 32 * 32 * 2 > kinds["features@detections"] > 0
    assert sum(kinds.values()) == sum(link.ledger.bytes_per_frame())
    # the boxes the senders sent joined the ego's before NMS
    ego_boxes = len(out.state.extras["ego_detections"][0].scores)
    sent = sum(len(r.payload["scores"]) for r in out.rounds["detections"])
    assert len(out.detections[0].scores) == ego_boxes + sent
    assert len(final.scores) <= ego_boxes + sent
    # training: no detections round (boxes are not differentiable), the map round still runs
    model.train()
    out = model(batch)
    assert list(out.rounds) == ["bev"] and out.detections is None


class QueryHead(torch.nn.Module):
    """A stand-in query head: two 'decoder layers' over one query per sample, calling the
    detector's hooks after each, the anchor head on the maps shifted by the final query."""

    decoder_layers = 2

    def __init__(self, anchor_head):
        super().__init__()
        self.anchor = anchor_head
        self.seen = []

    def forward(self, features, hooks=None):
        queries = features.mean((2, 3))  # (B, C)
        for layer in range(self.decoder_layers):
            queries = queries + 1.0
            if hooks and layer in hooks:
                queries = hooks[layer](queries)
            self.seen.append(queries.clone())
        return self.anchor(features + queries[:, :, None, None])

    def decode(self, out, b, threshold):
        return self.anchor.decode(out, b, threshold)


class QueryExchange(FusionMethod):
    """Senders send their mean feature as one query at decoder layer 1; the ego adds them."""

    contract = Contract(fuses_at=("decoder:1",))
    message_kind = "queries"
    codecs = {"query": "float32"}

    def encode(self, state, senders):
        return [{"query": state.features[i].mean((1, 2))} for i in senders]

    def fuse(self, state, received):
        queries = state.extras["queries"].clone()
        for r in received:
            queries[r.sample] = queries[r.sample] + r.payload["query"]
        return queries


def test_a_decoder_point_runs_inside_the_head(tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    base = build_detector(tiny_detector_cfg("max"))
    head = QueryHead(base.head)
    model = CoopDetector(base.encoder, base.backbone, QueryExchange(), head).eval()
    link = BatchChannel(Channel(0))
    with torch.no_grad():
        out = model(random_points_batch(_poses()), channel=link)
    assert list(out.rounds) == ["decoder:1"] and len(out.rounds["decoder:1"]) == 2
    assert set(link.ledger.per_kind()) == {"queries"} and link.ledger.mean_bytes() > 0
    first, second = head.seen
    sent = sum(r.payload["query"] for r in out.rounds["decoder:1"])
    torch.testing.assert_close(second[0], first[0] + 1.0 + sent)
    # a head without that decoder layer cannot serve the method: refused when building
    with pytest.raises(ValueError, match="decoder layers"):
        CoopDetector(base.encoder, base.backbone, QueryExchange(), base.head)


class Passes(MaxFusion):
    contract = Contract(fuses_at=("bev",), services={"passes", "confidence"}, passes=4,
                        pass_dropout=0.5)


def test_stochastic_passes_are_computed_when_declared(tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg("max")).eval()
    with torch.no_grad():
        out = model(random_points_batch(_poses()))
    assert "confidence_passes" not in out.state.extras and "confidence" not in out.state.extras
    model.fusion = Passes(channels=8)
    with torch.no_grad():
        out = model(random_points_batch(_poses()))
    passes = out.state.extras["confidence_passes"]
    assert passes.shape == (4, 3, 1, 32, 32)
    assert not torch.equal(passes[0], passes[1])  # dropout differs between passes
    assert out.state.extras["confidence"].shape == (3, 1, 32, 32)
