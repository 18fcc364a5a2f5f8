"""What the query-fusion tests (test_acco.py, test_quest.py) share: a 64 x 64 grid of 0.8 m
cells, 16-dim queries, a sender 10 m ahead and 4 m right turned 30 degrees, and builders of boxes
and of the queries standing for them. Loaded by path (the tests are no package)."""
import math

import torch

from v2xfuse.models.heads.query_decoder import Queries, anchors_from_boxes, front_logit
from v2xfuse.structures.bev import BevGrid
from v2xfuse.structures.transforms import pose_from_xyz_rpy

GRID = BevGrid(-25.6, -25.6, 25.6, 25.6, 0.8)
DIMS = 16
SENDER_POSE = pose_from_xyz_rpy(10.0, -4.0, 0.0, 0.0, 0.0, math.radians(30.0))  # ego_from_sender


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def queries(box_rows: torch.Tensor, scores, seed: int = 0) -> Queries:
    """One map's queries standing for ``box_rows`` (K, 7) with ``scores`` (K,)."""
    g = torch.Generator().manual_seed(seed)
    k = len(box_rows)
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return Queries(torch.randn(1, k, DIMS, generator=g), anchors_from_boxes(box_rows)[None],
                   torch.logit(scores)[None], front_logit(box_rows[:, 6])[None],
                   torch.ones(1, k, dtype=torch.bool), torch.randn(1, k, DIMS, generator=g))


def lost_alone_ideal(model, batch, ego_only_cfg: dict, lossy_link):
    """``model`` (trained, any query fusion) on ``batch`` three ways, in evaluation: its
    detections with every message refused by ``lossy_link`` (a LinkConfig), the detections of
    the same weights built from ``ego_only_cfg`` (fusion "none"), and its output with every
    message arriving -> (lost, alone, ideal_output, lossy_channel, ideal_channel)."""
    from v2xfuse.builder import build_detector
    from v2xfuse.comm.batch_link import BatchChannel
    from v2xfuse.comm.channel import Channel

    model.eval()
    ego_only = build_detector(ego_only_cfg)
    ego_only.load_state_dict({k: v for k, v in model.state_dict().items()
                              if not k.startswith("fusion.")})
    ego_only.eval()
    lossy, ideal = BatchChannel(Channel(0, lossy_link)), BatchChannel(Channel(0))
    with torch.no_grad():
        lost = model.predict(model(batch, channel=lossy))[0]
        alone = ego_only.predict(ego_only(batch))[0]
        out = model(batch, channel=ideal)
    return lost, alone, out, lossy, ideal
