"""ACCO: anchors between frames, the inside-box test, the byte formula against the serialised
length, attention over exactly what arrived, untrusted payloads, and the detector's rounds
inside the decoder layers (before their refinement)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel, LinkConfig
from v2xfuse.comm.message import Message, encode
from v2xfuse.fusion.acco import Acco, anchors_to_frame, inside_boxes
from v2xfuse.fusion.base import Contract, FusionState
from v2xfuse.models.detector import CoopDetector
from v2xfuse.models.heads.query_decoder import (Queries, anchors_from_boxes, boxes_from_anchors,
                                                front_logit)
from v2xfuse.registry import FUSION
from v2xfuse.structures.boxes import transform_boxes, wrap_angle
from v2xfuse.structures.transforms import pose_from_xyz_rpy
from v2xfuse.utils.scripts import load_script

_scene = load_script(Path(__file__).with_name("query_scene.py"))
GRID, DIMS, SENDER_POSE = _scene.GRID, _scene.DIMS, _scene.SENDER_POSE
boxes, queries = _scene.boxes, _scene.queries
QUERY_HEAD = {"type": "query", "num_queries": 12, "embed_dims": DIMS, "heads": 2, "ffn_dims": 32,
              "learned_points": 2, "decoder_layers": 3, "heatmap_channels": 8}


def state_with(random_points_batch, ego: Queries, sent: Queries, layer: int = 1) -> FusionState:
    batch = random_points_batch([np.eye(4), SENDER_POSE])
    state = FusionState(batch, None, GRID, point=f"decoder:{layer}")
    state.extras.update(queries=ego, sender_queries={layer: {1: sent}})
    return state


def transmit(method: Acco, state: FusionState, channel=None):
    payloads = method.encode(state, [1])
    if channel is None:
        return payloads, CoopDetector.direct(state.batch, [1], payloads)
    wire = method.wire(method.kind_at(state.point))
    return payloads, channel.transmit(wire, state.batch, [1], payloads, state=state)


EGO = boxes([0.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0], [-15.0, 8.0, -1.0, 4.2, 1.8, 1.5, 1.0])
SENT = boxes([5.0, 2.0, -0.8, 4.0, 1.8, 1.5, 0.2], [-3.0, 9.0, -1.0, 4.5, 1.9, 1.6, 2.0],
             [12.0, -7.0, -1.0, 4.1, 1.8, 1.5, -1.0], [1.0, 1.0, -1.0, 4.1, 1.8, 1.5, -2.5],
             [-8.0, -8.0, -1.0, 4.4, 1.9, 1.5, 3.0])
SCORES = [0.9, 0.1, 0.5, 0.7, 0.3]


# --- geometry ------------------------------------------------------------------------------
def test_an_anchor_moves_between_frames_with_exact_position_and_heading():
    pose = torch.from_numpy(SENDER_POSE).float()
    moved = anchors_to_frame(pose, anchors_from_boxes(SENT))
    c, s = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    torch.testing.assert_close(moved[0, :3], torch.tensor([10.0 + 5.0 * c - 2.0 * s,
                                                          -4.0 + 5.0 * s + 2.0 * c, -0.8]))
    yaw = torch.atan2(moved[:, 6], moved[:, 7])
    want = wrap_angle(SENT[:, 6] + math.radians(30.0))
    assert float(wrap_angle(yaw - want).abs().max()) < 1e-6
    torch.testing.assert_close(moved[:, 3:6], anchors_from_boxes(SENT)[:, 3:6])  # sizes kept
    # the same as moving the boxes, for every anchor
    back = boxes_from_anchors(moved, front_logit(want))
    torch.testing.assert_close(back, transform_boxes(pose, SENT), atol=1e-5, rtol=1e-5)
    # and back again
    torch.testing.assert_close(anchors_to_frame(torch.linalg.inv(pose), moved),
                               anchors_from_boxes(SENT), atol=1e-5, rtol=1e-5)


def test_the_inside_box_test_follows_the_box_s_rotation():
    # a 4 m x 2 m box at (10, 5) turned 90 degrees: it spans 1 m in x and 2 m in y
    anchor = anchors_from_boxes(boxes([10.0, 5.0, 0.0, 4.0, 2.0, 1.5, math.pi / 2]))
    points = torch.tensor([[10.0, 5.0], [10.0, 6.9], [10.0, 3.1], [10.9, 5.0], [11.5, 5.0],
                           [10.0, 7.2], [8.0, 5.0], [12.0, 5.0]])
    inside = inside_boxes(points, anchor)
    assert inside.shape == (1, 8)
    assert inside[0].tolist() == [True, True, True, True, False, False, False, False]
    # unrotated, the same points: the long side is along x now
    flat = inside_boxes(points, anchors_from_boxes(boxes([10.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.0])))
    assert flat[0].tolist() == [True, False, False, True, True, False, True, True]
    # 45 degrees: a point 1.9 m along the heading is in, the same point on the x axis is out
    d = 1.9 / math.sqrt(2)
    turned = anchors_from_boxes(boxes([0.0, 0.0, 0.0, 4.0, 2.0, 1.5, math.pi / 4]))
    assert inside_boxes(torch.tensor([[d, d], [1.9, 0.0]]), turned)[0].tolist() == [True, False]


# --- bytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k, threshold, sent", [(0, 0.2, 4), (2, 0.2, 2), (0, 0.6, 2),
                                                    (3, 0.0, 3), (0, 0.0, 5), (1, 0.95, 0)])
def test_top_k_and_the_threshold_change_bytes_as_the_formula_says(top_k, threshold, sent,
                                                                  random_points_batch):
    torch.manual_seed(0)
    method = Acco(DIMS, GRID, top_k=top_k, score_threshold=threshold).eval()
    state = state_with(random_points_batch, queries(EGO, [0.9, 0.9]), queries(SENT, SCORES))
    link = BatchChannel(Channel(0))
    payloads, received = transmit(method, state, link)
    if sent == 0:
        assert payloads == [None] and received == [] and link.ledger.bytes_per_frame() in ([], [0])
        return
    packet = payloads[0]
    assert len(packet["anchor"]) == sent
    # best first
    assert packet["score"].tolist() == sorted(packet["score"].tolist(), reverse=True)
    wire = method.wire("anchors@decoder:1")
    entries = {}
    for name, tensor in packet.items():
        entries.update(wire.codec(name).encode(tensor))
    serialised = len(encode(Message("1", "anchors@decoder:1", 0, np.eye(4), entries)))
    formula = 112 + len("1") + len("anchors@decoder:1") + (3 + 8 + len("anchor.f32")) + \
        (3 + 8 + len("feature.f16")) + (3 + 4 + len("score.f32")) + sent * (32 + 2 * DIMS + 4)
    assert link.ledger.bytes_per_frame() == [serialised] == [formula]
    assert method.message_bytes("1", sent) == formula


def test_the_documented_size_of_a_message():
    """acco.yaml's comment: D = 64, float16 features, layers [1, 2]."""
    method = Acco(64, GRID)
    for n in (0, 1, 16, 32, 64):
        assert method.message_bytes("1045", n) == 188 + 4 + 164 * n
        assert method.message_bytes("1045", n, layer=2) == 188 + 4 + 164 * n
    assert Acco(64, GRID, layers=[1]).message_bytes("1", 3) == 188 - 10 + 1 + 164 * 3
    # int8 features: 1 byte a value and one float32 scale (a 0-d array) instead of float16
    f16 = 3 + 8 + len("feature.f16") + 2 * 64 * 2
    int8 = (3 + 8 + len("feature.q") + 64 * 2) + (3 + len("feature.scale") + 4)
    assert Acco(64, GRID, feature_codec="int8").message_bytes("1", 2) == \
        188 + 1 + 164 * 2 - f16 + int8 == 407


# --- fusion --------------------------------------------------------------------------------
def test_attention_sees_exactly_the_received_anchors(random_points_batch):
    torch.manual_seed(0)
    method = Acco(DIMS, GRID, top_k=2, score_threshold=0.2, heads=2).eval()
    for p in (method.attn_out, method.local_out):
        torch.nn.init.normal_(p.weight, std=0.5)
    ego = queries(EGO, [0.9, 0.9])
    sent = queries(SENT, SCORES)
    state = state_with(random_points_batch, ego, sent)
    _, received = transmit(method, state)
    fused = method.fuse(state, received)
    added, weights = method.fuse_sample(ego.features[0], ego.positions[0], ego.anchors[0],
                                        received)
    assert weights.shape == (2, 2, 2)  # heads, ego queries, the 2 anchors sent (0.9 and 0.7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(fused.features[0], ego.features[0] + added)
    assert not torch.allclose(fused.features, ego.features)
    # an anchor that was not sent (score 0.5, third) changes nothing, a sent one does
    for k, changes in ((2, False), (1, False), (4, False), (3, True)):
        moved = queries(SENT, SCORES)
        moved.anchors[0, k, :2] += 3.0
        moved.features[0, k] += 1.0
        state_k = state_with(random_points_batch, ego, moved)
        fused_k = method.fuse(state_k, transmit(method, state_k)[1])
        assert torch.allclose(fused_k.features, fused.features) is not changes, k


def test_local_fusion_adds_the_score_weighted_features_inside_each_ego_box(random_points_batch):
    torch.manual_seed(0)
    method = Acco(DIMS, GRID, top_k=0, score_threshold=0.0).eval()
    with torch.no_grad():
        method.local_out.weight.copy_(torch.eye(DIMS))
        method.local_proj.weight.copy_(torch.eye(DIMS))
        method.local_proj.bias.zero_()
    identity = pose_from_xyz_rpy(0, 0, 0, 0, 0, 0)
    ego = queries(EGO, [0.9, 0.9])
    # two anchors inside the ego's first box (one by 2 m along its length), one outside both
    sent = queries(boxes([0.3, 0.2, -1.0, 4.0, 1.8, 1.5, 0.5], [2.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0],
                         [0.0, 3.0, -1.0, 4.0, 1.8, 1.5, 0.0]), [0.8, 0.4, 0.9])
    batch = random_points_batch([np.eye(4), identity])
    state = FusionState(batch, None, GRID, point="decoder:1")
    state.extras.update(queries=ego, sender_queries={1: {1: sent}})
    received = transmit(method, state)[1]
    fused = method.fuse(state, received)
    f = sent.features[0]
    want0 = ego.features[0, 0] + 0.8 * f[0] + 0.4 * f[1]
    torch.testing.assert_close(fused.features[0, 0], want0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.features[0, 1], ego.features[0, 1])
    torch.testing.assert_close(fused.anchors, ego.anchors)  # the refinement moves them
    torch.testing.assert_close(fused.logits, ego.logits)


def test_messages_that_fail_the_checks_are_dropped_and_counted(random_points_batch):
    torch.manual_seed(0)
    method = Acco(DIMS, GRID, top_k=3, score_threshold=0.0).eval()
    batch = random_points_batch([np.eye(4), SENDER_POSE, SENDER_POSE, SENDER_POSE,
                                 SENDER_POSE, SENDER_POSE])
    state = FusionState(batch, None, GRID, point="decoder:1")
    sent = {i: queries(SENT[:3], SCORES[:3], seed=i) for i in range(1, 6)}
    state.extras.update(queries=queries(EGO, [0.9, 0.9]), sender_queries={1: sent})
    payloads = method.encode(state, [1, 2, 3, 4, 5])
    payloads[0]["anchor"] = payloads[0]["anchor"] * float("nan")       # NaN
    payloads[1]["score"] = torch.tensor([3.0, 0.5, 0.5])                # not probabilities
    payloads[2]["feature"] = torch.zeros(3, DIMS + 1)                   # another shape
    payloads[3] = {k: torch.cat([v, v[:1]]) for k, v in payloads[3].items()}  # 4 > top_k
    link = BatchChannel(Channel(0))
    received = link.transmit(method.wire("anchors@decoder:1"), batch, [1, 2, 3, 4, 5], payloads,
                             state=state)
    assert link.ledger.rejected.as_dict() == {"nonfinite": 1, "bounds": 2, "shape": 1}
    assert [r.sender for r in received] == [5]
    fused = method.fuse(state, received)
    assert fused.features.shape == (1, 2, DIMS)
    # a log size far beyond any box is refused too
    bad = dict(payloads[4])
    bad["anchor"] = bad["anchor"].clone()
    bad["anchor"][0, 3] = 9.0
    with pytest.raises(Exception, match="anchor"):
        method.check_payload("anchors@decoder:1", bad, state)


# --- in the detector -----------------------------------------------------------------------
def test_the_fusion_runs_before_the_layer_s_refinement():
    """A hook ``before_refine`` changes the refined anchors of its own layer; after the layer
    it cannot."""
    from v2xfuse.models.heads.query_head import QueryHead
    torch.manual_seed(0)
    head = QueryHead(8, GRID, num_queries=6, embed_dims=DIMS, heads=2, ffn_dims=32,
                     learned_points=2, decoder_layers=2, heatmap_channels=8).eval()
    for layer in head.layers:
        torch.nn.init.normal_(layer.refine[-1].weight, std=0.3)
    maps = torch.randn(1, 8, 64, 64)

    def shift(q):
        return Queries(q.features + 1.0, q.anchors, q.logits, q.front, q.valid, q.positions)

    with torch.no_grad():
        plain = head(maps)
        before = head(maps, hooks={0: shift}, before_refine=True)
        after = head(maps, hooks={0: shift})
        sender = head.queries_after(maps, [0], before_refine=True)[0]
    torch.testing.assert_close(after.layers[0].anchors, plain.layers[0].anchors)
    assert not torch.allclose(before.layers[0].anchors, plain.layers[0].anchors)
    # the senders' queries at that place: the layer's anchors before its refinement
    refined = head.layers[0].refine_queries(sender, head.anchor_encoder)
    torch.testing.assert_close(refined.anchors, plain.layers[0].anchors)
    torch.testing.assert_close(plain.final.anchors, head(maps, hooks={0: lambda q: q},
                                                         before_refine=True).final.anchors)


def test_the_detector_fuses_at_each_layer_trains_and_degrades_to_ego_only(
        tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    cfg = tiny_detector_cfg("acco", head=QUERY_HEAD)
    cfg["model"]["fusion"].update(layers=[1, 2], score_threshold=0.0, top_k=4, heads=2)
    model = build_detector(cfg)
    assert model.fusion.contract.fuses_at == ("decoder:1", "decoder:2")
    assert model.fusion.contract.fuse_before_refine and model.fusion.query_dims == DIMS
    batch = random_points_batch([np.eye(4), SENDER_POSE, pose_from_xyz_rpy(-6, 3, 0, 0, 0, 2.0)])
    batch.gt_boxes[0] = boxes([2.0, 1.0, -1.0, 4.5, 1.9, 1.6, 0.3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # the refinements' and ACCO's output layers start at zero: the first step moves the
    # refinements, the second ACCO's outputs, the third reaches its attention
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(model(batch), batch)["loss"].backward()
        optimizer.step()
    fusion = model.fusion
    for name in ("attn_out", "k_proj", "q_proj", "v_proj"):
        assert getattr(fusion, name).weight.grad.abs().sum() > 0, name
    assert fusion.range.known  # the senders' features were observed
    assert sum(p.grad is None for p in fusion.parameters()) == 0

    lost, alone, out, _, ideal = _scene.lost_alone_ideal(
        model, batch, tiny_detector_cfg("none", head=QUERY_HEAD), LinkConfig(loss=1.0))
    with torch.no_grad():
        fused = model.predict(out)[0]
    assert list(out.rounds) == ["decoder:1", "decoder:2"]
    for point in out.rounds:
        assert sorted(r.sender for r in out.rounds[point]) == [1, 2]
    per_round = model.fusion.message_bytes("1", 4) + model.fusion.message_bytes("2", 4)
    assert ideal.ledger.bytes_per_frame() == [2 * per_round]
    torch.testing.assert_close(lost.boxes, alone.boxes)  # nothing arrived: the ego alone
    torch.testing.assert_close(lost.scores, alone.scores)
    assert not (len(fused.scores) == len(alone.scores) and torch.allclose(fused.scores,
                                                                          alone.scores))


def test_acco_is_registered_and_refuses_what_it_cannot_serve(tiny_detector_cfg):
    assert FUSION.get("acco") is Acco
    with pytest.raises(ValueError, match="fuses object queries"):
        build_detector(tiny_detector_cfg("acco"))
    cfg = tiny_detector_cfg("acco", head=QUERY_HEAD)
    cfg["model"]["fusion"]["layers"] = [1, 3]
    with pytest.raises(ValueError, match="decoder:3"):
        build_detector(cfg)
    with pytest.raises(ValueError, match="heads"):
        Acco(DIMS, GRID, heads=3)
    with pytest.raises(ValueError, match="layers"):
        Acco(DIMS, GRID, layers=[1, 1])
    with pytest.raises(ValueError, match="fuse_before_refine"):
        Contract(fuses_at=("bev",), fuse_before_refine=True)


# --- camera mode ---------------------------------------------------------------------------
def test_camera_mode_senders_and_ego_read_their_own_cameras_and_the_bytes_are_unchanged(
        tiny_detector_cfg, random_points_batch, monkeypatch):
    """ACCO over a query head in camera mode (``sample_from: camera``): every head call gets
    the cameras of its maps' agents, renumbered (the ego's for the ego's queries, the senders'
    for the queries they send), their features the very image features the lss encoder computed
    for its BEV maps; training reaches the image backbone through the key points; what is sent,
    and its bytes, is what BEV mode sends."""
    from dataclasses import replace

    from v2xfuse.datasets.batch import CameraBatch
    from v2xfuse.models.heads.query_head import QueryHead
    from v2xfuse.structures.transforms import make_transform

    camera = {"type": "lss", "cell": 0.8, "out_channels": 8, "depth": [1.0, 21.0, 1.0],
              "stride": 8, "image_channels": [8, 8, 8]}
    head = {**QUERY_HEAD, "sample_from": "camera", "camera_heights": [-0.5, 0.5]}
    cfg = tiny_detector_cfg("acco", encoder=None, encoders={"camera": camera}, head=head,
                            sender_frame="own")
    cfg["pipeline"]["cameras"] = {"image_size": [32, 48]}
    cfg["model"]["fusion"].update(layers=[1, 2], score_threshold=0.0, top_k=4, heads=2)
    torch.manual_seed(0)
    model = build_detector(cfg)
    assert model.head.reads_images
    assert model.head.layers[0].sample.value.in_features == 8          # the image features' c
    for layer in model.head.layers:  # outputs that start at zero would hide the gradient
        torch.nn.init.normal_(layer.cls[-1].weight, std=0.3)
    cv = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])

    def looking(yaw):
        c, s = np.cos(yaw), np.sin(yaw)
        return make_transform(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ cv, (0.0, 0.0, 0.0))

    intrinsic = np.array([[24.0, 0, 23.5], [0, 24.0, 15.5], [0, 0, 1]])
    agents = [0, 0, 1, 2]
    poses = [looking(0.0), looking(np.pi), looking(0.5), looking(-1.0)]
    g = torch.Generator().manual_seed(0)
    cams = CameraBatch(torch.randint(0, 256, (4, 3, 32, 48), dtype=torch.uint8, generator=g),
                       torch.tensor(agents), torch.from_numpy(np.stack([intrinsic] * 4)),
                       torch.from_numpy(np.stack(poses)))
    batch = random_points_batch([np.eye(4), SENDER_POSE, pose_from_xyz_rpy(-6, 3, 0, 0, 0, 2.0)])
    batch = replace(batch, cameras=cams)
    batch.gt_boxes[0] = boxes([4.0, 1.0, -1.0, 4.5, 1.9, 1.6, 0.3])

    seen = {}
    forward, after = QueryHead.forward, QueryHead.queries_after

    def spy_forward(self, features, *args, cameras=None, **kw):
        seen.setdefault("forward", []).append(cameras)
        return forward(self, features, *args, cameras=cameras, **kw)

    def spy_after(self, features, layers, *args, cameras=None, **kw):
        seen["after"] = cameras
        return after(self, features, layers, *args, cameras=cameras, **kw)

    monkeypatch.setattr(QueryHead, "forward", spy_forward)
    monkeypatch.setattr(QueryHead, "queries_after", spy_after)
    out = model(batch)
    everyone = out.state.extras["camera_features"]
    assert everyone.agent.tolist() == agents and everyone.image_size == (32, 48)
    ego = seen["forward"][0]
    assert ego.agent.tolist() == [0, 0] and torch.equal(ego.features, everyone.features[:2])
    senders = seen["after"]
    assert senders.agent.tolist() == [0, 1]                     # agents 1 and 2, renumbered
    assert torch.equal(senders.features, everyone.features[2:])
    assert torch.equal(senders.lidar_from_camera, cams.lidar_from_camera[2:])
    losses = model.loss(out, batch)
    losses["loss"].backward()
    sampling = model.head.layers[1].sample.value.weight.grad
    assert sampling is not None and sampling.abs().sum() > 0
    assert model.encoder.image_net.layers[0].weight.grad.abs().sum() > 0

    model.eval()
    ideal = BatchChannel(Channel(0))
    with torch.no_grad():
        out = model(batch, channel=ideal)
    assert list(out.rounds) == ["decoder:1", "decoder:2"]
    for point in out.rounds:
        assert sorted(r.sender for r in out.rounds[point]) == [1, 2]
    per_round = model.fusion.message_bytes("1", 4) + model.fusion.message_bytes("2", 4)
    assert ideal.ledger.bytes_per_frame() == [2 * per_round]
