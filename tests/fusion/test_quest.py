"""QUEST: query streams, one packet per query, through the real bytes of the channel; poses,
fusion and complementation, the byte formula, packet loss and untrusted packets."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel, LinkConfig
from v2xfuse.comm.message import Message, encode
from v2xfuse.fusion.base import FusionState
from v2xfuse.fusion.quest import Quest
from v2xfuse.models.detector import CoopDetector
from v2xfuse.models.inputs import AgentInputs
from v2xfuse.models.heads.query_decoder import Queries, boxes_from_anchors
from v2xfuse.registry import FUSION
from v2xfuse.structures.boxes import transform_boxes, wrap_angle
from v2xfuse.structures.transforms import pose_from_xyz_rpy
from v2xfuse.utils.scripts import load_script

_scene = load_script(Path(__file__).with_name("query_scene.py"))
GRID, DIMS, SENDER_POSE = _scene.GRID, _scene.DIMS, _scene.SENDER_POSE
boxes, queries = _scene.boxes, _scene.queries
QUERY_HEAD = {"type": "query", "num_queries": 12, "embed_dims": DIMS, "heads": 2, "ffn_dims": 32,
              "learned_points": 2, "decoder_layers": 2, "heatmap_channels": 8}


def state_with(random_points_batch, ego: Queries, sent: Queries) -> FusionState:
    batch = random_points_batch([np.eye(4), SENDER_POSE])
    state = FusionState(batch, None, GRID, point="decoder:1")
    state.extras.update(queries=ego, sender_queries={1: {1: sent}})
    return state


def stream(method: Quest, state: FusionState, channel=None):
    """The sender's packets through ``channel`` (or straight through), fused by the ego."""
    payloads = method.encode(state, [1])
    if channel is None:
        received = CoopDetector.direct(state.batch, [1], payloads)
    else:
        received = channel.transmit(method.wire(), state.batch, [1], payloads, state=state)
    return payloads, received, method.fuse(state, received)


EGO = boxes([0.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0], [-15.0, 8.0, -1.0, 4.2, 1.8, 1.5, 1.0])


def test_a_received_query_lands_at_its_reference_point_in_the_ego_frame(random_points_batch):
    torch.manual_seed(0)
    method = Quest(DIMS, GRID).eval()
    sent_box = boxes([5.0, 2.0, -0.8, 4.0, 1.8, 1.5, 0.2])
    state = state_with(random_points_batch, queries(EGO, [0.9, 0.9]), queries(sent_box, [0.8]))
    _, received, fused = stream(method, state, BatchChannel(Channel(0)))
    assert len(received) == 1 and received[0].packets == [0]
    assert fused.valid[0].sum() == 3  # the ego's two and the one appended
    c, s = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
    expected = torch.tensor([10.0 + 5.0 * c - 2.0 * s, -4.0 + 5.0 * s + 2.0 * c, -0.8])
    torch.testing.assert_close(fused.anchors[0, 2, :3], expected)
    box = boxes_from_anchors(fused.anchors[0, 2], fused.front[0, 2])
    assert abs(float(wrap_angle(box[6] - (0.2 + math.radians(30.0))))) < 1e-5
    torch.testing.assert_close(box[3:6], sent_box[0, 3:6])
    assert float(torch.sigmoid(fused.logits[0, 2])) == pytest.approx(0.8, abs=1e-5)


def test_matched_queries_are_fused_and_exactly_the_unmatched_ones_appended(random_points_batch):
    torch.manual_seed(0)
    method = Quest(DIMS, GRID).eval()
    # in the sender's frame: the ego's first car seen 0.5 m off, and two cars the ego lacks
    ego_from_sender = torch.from_numpy(SENDER_POSE).float()
    sender_from_ego = torch.linalg.inv(ego_from_sender)
    seen = transform_boxes(sender_from_ego, boxes([0.5, 0.0, -1.0, 4.4, 1.9, 1.6, 0.05],
                                                  [8.0, 12.0, -1.0, 4.0, 1.7, 1.5, 1.5],
                                                  [-6.0, -14.0, -1.0, 5.0, 2.0, 1.7, -0.7]))
    ego = queries(EGO, [0.9, 0.9])
    state = state_with(random_points_batch, ego, queries(seen, [0.9, 0.7, 0.6]))
    _, received, fused = stream(method, state)
    assert fused.features.shape == (1, 4, DIMS) and fused.valid.all()
    assert not torch.allclose(fused.features[0, 0], ego.features[0, 0])  # co-aware: fused
    torch.testing.assert_close(fused.features[0, 1], ego.features[0, 1])  # nobody else saw it
    torch.testing.assert_close(fused.anchors[0, :2], ego.anchors[0])  # the ego's boxes kept
    appended = boxes_from_anchors(fused.anchors[0, 2:], fused.front[0, 2:])
    torch.testing.assert_close(appended[:, :2], boxes([8.0, 12.0], [-6.0, -14.0]),
                               atol=1e-4, rtol=0)
    # a second message of the same cars matches the ones appended: nothing more is added
    again = method.fuse_message({"features": fused.features[0], "anchors": fused.anchors[0],
                                 "logits": fused.logits[0], "front": fused.front[0]},
                                received[0])
    assert len(again["logits"]) == 4
    # the gate: the same car 3 m off (more than half its diagonal) is another car
    far = transform_boxes(sender_from_ego, boxes([3.0, 0.0, -1.0, 4.4, 1.9, 1.6, 0.0]))
    state = state_with(random_points_batch, ego, queries(far, [0.9]))
    assert stream(method, state)[2].features.shape[1] == 3


@pytest.mark.parametrize("halves, feature_codec, box_codec", [
    (["feature", "position"], "float16", "float32"),
    (["feature"], "float32", "float32"),
    (["position"], "int8", "float16"),
])
def test_each_packet_is_one_query_of_the_formula_s_bytes(halves, feature_codec, box_codec,
                                                        random_points_batch):
    torch.manual_seed(0)
    method = Quest(DIMS, GRID, halves=halves, feature_codec=feature_codec,
                   box_codec=box_codec).eval()
    sent = boxes([5.0, 2.0, -0.8, 4.0, 1.8, 1.5, 0.2], [-3.0, 9.0, -1.0, 4.5, 1.9, 1.6, 2.0],
                 [12.0, -7.0, -1.0, 4.1, 1.8, 1.5, -1.0])
    state = state_with(random_points_batch, queries(EGO, [0.9, 0.9]),
                       queries(sent, [0.9, 0.1, 0.5]))
    link = BatchChannel(Channel(0))
    payloads, received, _ = stream(method, state, link)
    packets = payloads[0]
    assert len(packets) == 2  # score >= 0.2: the first and the third, best first
    records = link.ledger.records
    assert [r.packet for r in records] == [0, 1] and {r.kind for r in records} == {"queries"}
    wire = method.wire()
    for k, (record, packet) in enumerate(zip(records, packets)):
        entries = {}
        for name, tensor in packet.items():
            entries.update(wire.codec(name).encode(tensor))
        serialised = len(encode(Message("1", "queries", 0, np.eye(4), entries, packet=(k, 2))))
        assert record.num_bytes == serialised == method.packet_bytes("1")
    # the formula, written out: header, packet place, ids, then each array's head and data
    data = {"float32": 4, "float16": 2}
    suffix = {"float32": "f32", "float16": "f16"}

    def array(key, ndim, nbytes):
        return 3 + 4 * ndim + len(key) + nbytes

    half = {h: array(f"{h}.q", 1, DIMS) + array(f"{h}.scale", 0, 4) if feature_codec == "int8"
            else array(f"{h}.{suffix[feature_codec]}", 1, data[feature_codec] * DIMS)
            for h in halves}
    assert method.packet_bytes("1") == (112 + 4 + len("1") + len("queries")
                                        + array(f"box.{suffix[box_codec]}", 1, data[box_codec] * 7)
                                        + array("score.f32", 1, 4) + sum(half.values()))
    assert link.ledger.bytes_per_frame() == [2 * method.packet_bytes("1")]
    got = received[0].payload
    torch.testing.assert_close(torch.stack([p["box"] for p in got]).float(),
                               torch.stack([p["box"] for p in packets]), atol=0.02, rtol=1e-3)


@pytest.mark.parametrize("packet_loss", [0.0, 0.5, 0.9, 1.0])
def test_lost_packets_are_lost_queries_and_the_ego_fuses_what_arrived(packet_loss,
                                                                     random_points_batch):
    torch.manual_seed(0)
    method = Quest(DIMS, GRID, score_threshold=0.0).eval()
    rng = np.random.default_rng(0)
    # cars the ego lacks: around the sender, inside the ego's grid, away from the ego's cars
    ego_from_sender = torch.from_numpy(SENDER_POSE).float()
    xy = torch.from_numpy(rng.uniform(-8, 8, (80, 2))).float()
    in_ego = xy @ ego_from_sender[:2, :2].T + ego_from_sender[:2, 3]
    xy = xy[torch.cdist(in_ego, EGO[:, :2]).amin(1) > 4.0][:40]
    n = len(xy)
    sent = torch.cat([xy, torch.tensor([[-1.0, 4.5, 1.9, 1.6, 0.0]]).expand(n, 5)], 1)
    ego = queries(EGO, [0.9, 0.9])
    state = state_with(random_points_batch, ego, queries(sent, torch.full((n,), 0.5)))
    link = BatchChannel(Channel(3, LinkConfig(packet_loss=packet_loss)))
    _, received, fused = stream(method, state, link)
    records = link.ledger.records
    assert len(records) == n  # every packet went on air and is counted
    arrived = [r.packet for r in records if r.status == "sent"]
    assert {r.status for r in records} <= {"sent", "lost"}
    if packet_loss == 0.0:
        assert arrived == list(range(n))
    if packet_loss == 1.0:
        assert arrived == [] and received == [] and fused is ego
        return
    assert 0 < len(arrived) and (packet_loss < 0.9 or len(arrived) < n // 2)
    assert received[0].packets == arrived and received[0].num_packets == n
    # the sent boxes are far from the ego's two: each query that arrived was appended
    assert int(fused.valid[0].sum()) == 2 + len(arrived)
    got = torch.stack([p["box"] for p in received[0].payload])
    want = transform_boxes(ego_from_sender, got)
    torch.testing.assert_close(fused.anchors[0, 2:2 + len(arrived), :2], want[:, :2])


def test_packets_that_fail_the_checks_are_dropped_and_counted(random_points_batch):
    torch.manual_seed(0)
    method = Quest(DIMS, GRID, score_threshold=0.0).eval()
    sent = boxes([5.0, 2.0, -0.8, 4.0, 1.8, 1.5, 0.2], [-3.0, 9.0, -1.0, 4.5, 1.9, 1.6, 2.0],
                 [12.0, -7.0, -1.0, 4.1, 1.8, 1.5, -1.0], [1.0, 1.0, -1.0, 4.1, 1.8, 1.5, -1.0])
    state = state_with(random_points_batch, queries(EGO[:0], []), queries(sent, [0.9] * 4))
    payloads = method.encode(state, [1])
    payloads[0][0]["box"] = payloads[0][0]["box"] * float("nan")  # NaN
    payloads[0][1]["score"] = torch.tensor([3.0])                # not a probability
    payloads[0][2]["feature"] = torch.zeros(DIMS + 1)             # another shape
    link = BatchChannel(Channel(0))
    received = link.transmit(method.wire(), state.batch, [1], payloads, state=state)
    assert link.ledger.rejected.as_dict() == {"shape": 1, "nonfinite": 1, "bounds": 1}
    assert received[0].packets == [3]
    fused = method.fuse(state, received)
    assert fused.features.shape == (1, 1, DIMS)  # the ego had none: the one that passed


def test_the_detector_streams_queries_trains_end_to_end_and_degrades_to_ego_only(
        tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    cfg = tiny_detector_cfg("quest", head=QUERY_HEAD)
    cfg["model"]["fusion"].update(layer=0, score_threshold=0.0, top_k=5)
    model = build_detector(cfg)
    assert model.fusion.contract.fuses_at == ("decoder:0",) and model.fusion.query_dims == DIMS
    batch = random_points_batch([np.eye(4), SENDER_POSE, pose_from_xyz_rpy(-6, 3, 0, 0, 0, 2.0)])
    batch.gt_boxes[0] = boxes([2.0, 1.0, -1.0, 4.5, 1.9, 1.6, 0.3])
    out = model(batch)
    assert out.head.layers[0].features.shape[1] == 12  # the ego's own, before fusion
    assert 12 < int(out.head.final.valid[0].sum()) <= 12 + 2 * 5  # 5 from each collaborator
    # the layers' output residuals start at zero, so the queries learn from the second step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model.loss(model(batch), batch)["loss"].backward()
        optimizer.step()
    assert model.fusion.align["feature"].weight.grad.abs().sum() > 0
    assert model.fusion.fuse_proj.weight.grad is not None

    lost, alone, out, lossy, ideal = _scene.lost_alone_ideal(
        model, batch, tiny_detector_cfg("none", head=QUERY_HEAD), LinkConfig(packet_loss=1.0))
    sent = 5 * (model.fusion.packet_bytes("1") + model.fusion.packet_bytes("2"))
    assert lossy.ledger.bytes_per_frame() == ideal.ledger.bytes_per_frame() == [sent]
    torch.testing.assert_close(lost.boxes, alone.boxes)  # nothing arrived: the ego alone
    torch.testing.assert_close(lost.scores, alone.scores)
    assert list(out.rounds) == ["decoder:0"]
    assert sorted(r.sender for r in out.rounds["decoder:0"]) == [1, 2]


def test_the_documented_size_of_a_query():
    """quest.yaml's comment: D = 64, box and score float32, both halves float16."""
    assert Quest(64, GRID).packet_bytes("1045") == 478 + 4
    assert Quest(64, GRID, feature_codec="int8").packet_bytes("1") == 388
    assert Quest(64, GRID, halves=["feature"]).packet_bytes("1") == 479 - 147


def test_quest_is_registered_and_refuses_a_head_without_queries(tiny_detector_cfg):
    assert FUSION.get("quest") is Quest
    with pytest.raises(ValueError, match="fuses object queries"):
        build_detector(tiny_detector_cfg("quest"))
    with pytest.raises(ValueError, match="halves"):
        Quest(DIMS, GRID, halves=["both"])


def test_send_layer_streams_the_collaborators_final_queries(tiny_detector_cfg,
                                                            random_points_batch):
    """send_layer -1: every collaborator runs its whole decoder and sends what its last layer
    gives (boxes and scores), while the ego still fuses after its layer 0."""
    torch.manual_seed(0)
    cfg = tiny_detector_cfg("quest", head=QUERY_HEAD)
    cfg["model"]["fusion"].update(layer=0, send_layer=-1, score_threshold=0.0, top_k=5)
    model = build_detector(cfg).eval()
    with torch.no_grad():  # the layers' refinements start at zero: make the layers differ
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.fusion.contract.sender_query_layer == -1
    batch = random_points_batch([np.eye(4), SENDER_POSE])
    sent = {}
    encode = model.fusion.encode
    model.fusion.encode = lambda state, senders: sent.setdefault("p", encode(state, senders))
    with torch.no_grad():
        model(batch)
        features = model.bev(AgentInputs.from_batch(batch))
        final = model.head.queries_after(features[[1]], [1])[1]   # the last of 2 layers
        inner = model.head.queries_after(features[[1]], [0])[0]
    index = Quest.select(model.fusion, final)
    got = torch.stack([p["box"] for p in sent["p"][0]])
    torch.testing.assert_close(got, final.boxes()[0, index])
    assert not torch.allclose(got, inner.boxes()[0, Quest.select(model.fusion, inner)])
    with pytest.raises(ValueError, match="decoder layer 2"):
        cfg["model"]["fusion"]["send_layer"] = 2
        build_detector(cfg)
