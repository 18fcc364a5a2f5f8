"""The detector's rotated NMS keeps labels and extras with the boxes that survive."""
import torch

from v2xfuse.builder import build_detector
from v2xfuse.structures import Detections


def test_extras_survive_nms_aligned(tiny_detector_cfg):
    model = build_detector(tiny_detector_cfg(post={"nms_iou": 0.15, "max_detections": 3}))
    # Pairs of overlapping boxes (0/1, 2/3, 4/5) and one alone (6); scores unordered.
    x = torch.tensor([0.0, 0.2, 10.0, 10.3, -10.0, -10.1, 5.0])
    boxes = torch.zeros(7, 7)
    boxes[:, 0] = x
    boxes[:, 3:6] = torch.tensor([4.0, 2.0, 1.5])
    scores = torch.tensor([0.3, 0.9, 0.8, 0.2, 0.1, 0.5, 0.6])
    dets = Detections(boxes, scores, labels=torch.arange(7),
                      extras={"uncertainty": x[:, None] * 2, "track_id": torch.arange(7) + 10})
    kept = model._nms(dets)
    assert torch.equal(kept.labels, torch.tensor([1, 2, 6]))  # best of each pair, best 3 first
    assert torch.equal(kept.scores, scores[[1, 2, 6]])
    assert torch.equal(kept.extras["uncertainty"][:, 0], kept.boxes[:, 0] * 2)
    assert torch.equal(kept.extras["track_id"], kept.labels + 10)
