"""Heterogeneous collaboration (``dataset.sensors``): every registered fusion method trains and
predicts with LiDAR-only cars and a camera-only roadside unit, on a detector with a LiDAR and a
camera encoder and a conv sensor fuser, through the real bytes of the channel at inference."""
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel
from v2xfuse.datasets import CoopSampler, Opv2vAdapter, PipelineConfig, collate
from v2xfuse.registry import FUSION

LIDAR = {"type": "pointpillars", "voxel_size": [0.8, 0.8], "out_channels": 8}
CAMERA = {"type": "camera_bev", "out_channels": 4, "hidden_channels": 4}
SENSORS = {"ego": ["lidar"], "vehicle": ["lidar"], "infrastructure": ["camera"]}
IMAGE_SIZE = [24, 40]
# what a method needs besides its name: QUEST and ACCO a query head (and, untrained, to send whatever
# scores its queries get)
NEEDS = {"quest": {"head": {"type": "query", "num_queries": 8, "embed_dims": 8, "heads": 2,
                            "ffn_dims": 16, "learned_points": 2, "decoder_layers": 2,
                            "heatmap_channels": 4}}}
NEEDS["acco"] = NEEDS["quest"]  # ACCO fuses inside the query decoder too
SETTINGS = {"quest": {"score_threshold": 0.0, "top_k": 3},
            "acco": {"score_threshold": 0.0, "top_k": 3, "layers": [1], "heads": 2}}


def _methods():
    import v2xfuse.fusion  # noqa: F401  (registers every method)

    return FUSION.names()


@pytest.fixture(scope="module")
def hetero_batch(tiny_camera_data):
    """Samples 1 and 2 of the tiny camera dataset: LiDAR-only ego and CAV, camera-only roadside
    unit, each agent with its previous frame (``late_tc`` reads it)."""
    adapter = Opv2vAdapter(tiny_camera_data("opv2v"), "train", comm_range=1e3, load_images=True,
                           history_frames=1, sensors=SENSORS)
    pipeline = PipelineConfig.from_dict({"lidar_range": [-12.8, -12.8, -4.0, 12.8, 12.8, 2.0],
                                         "cameras": {"image_size": IMAGE_SIZE}})
    batch = collate([CoopSampler(adapter, pipeline, train=False)[i] for i in (1, 2)])
    rsu = torch.nonzero(batch.agent_kind == 1).squeeze(1)
    assert len(rsu) == 2 and set(batch.cameras.agent.tolist()) == set(rsu.tolist())
    assert not torch.isin(batch.points[:, 0].long(), rsu).any()
    return batch


def test_every_registered_method_is_tested():
    assert {"none", "early", "late", "late_tc", "max", "attfuse", "where2comm",
            "codefilling", "quest", "acco"} <= set(_methods())


@pytest.mark.parametrize("method", _methods())
def test_a_lidar_ego_and_a_camera_only_roadside_unit(method, tiny_detector_cfg, hetero_batch):
    cfg = tiny_detector_cfg(method, encoder=None, encoders={"lidar": LIDAR, "camera": CAMERA},
                            sensor_fuser={"type": "conv"}, agent_loss_weight=0.5,
                            **NEEDS.get(method, {}))
    cfg["model"]["fusion"].update(SETTINGS.get(method, {}))
    cfg["pipeline"]["cameras"] = {"image_size": IMAGE_SIZE}
    torch.manual_seed(0)
    model = build_detector(cfg)
    batch = hetero_batch
    rsu = torch.nonzero(batch.agent_kind == 1).squeeze(1).tolist()
    mask = model.modality_mask(batch)
    assert mask[:, 0].tolist() == [i not in rsu for i in range(batch.num_agents)]  # lidar
    assert mask[:, 1].tolist() == [i in rsu for i in range(batch.num_agents)]      # camera

    model.train()
    out = model(batch)
    assert out.state.sensors == ("lidar", "camera")
    assert torch.equal(out.state.modality_mask, mask)
    assert out.state.has("camera").tolist() == mask[:, 1].tolist()
    losses = model.loss(out, batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    if method not in ("none", "early"):  # the roadside unit's camera map reaches the loss
        # (early fusion encodes the points the ego gathered, with its own cameras only)
        grad = model.encoder.encoders["camera"].image_net[0].weight.grad
        assert grad is not None and grad.abs().sum() > 0

    model.eval()
    channel = BatchChannel(Channel(0))
    with torch.no_grad():
        out = model(batch, channel=channel)
        dets = model.predict(out)
    assert len(dets) == 2 and all(torch.isfinite(d.boxes).all() for d in dets)
    senders = {r.sender for r in out.received}
    if method == "none":
        assert not senders
    elif method == "early":  # raw points only: the camera-only unit has none to send
        assert senders and not senders & set(rsu)
    else:  # maps or boxes made from its camera
        assert set(rsu) <= senders
    if method in ("late", "late_tc"):
        own = model.detect_agents(out.state.features, rsu)
        sent = [r for r in out.received if r.sender in rsu]
        for r, d in zip(sorted(sent, key=lambda r: r.sender), own):
            torch.testing.assert_close(r.payload["boxes"], d.boxes.float())
        assert out.state.features[rsu].abs().sum() > 0  # its map: from its camera alone
