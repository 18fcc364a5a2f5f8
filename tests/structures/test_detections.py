"""Detections keep every per-box field aligned with its box."""
import pytest
import torch

from v2xfuse.structures import Detections


def make(k=4):
    boxes = torch.zeros(k, 7)
    boxes[:, 0] = torch.arange(k, dtype=torch.float32)
    boxes[:, 3:6] = 1.0
    return Detections(boxes, torch.linspace(0.9, 0.1, k),
                      extras={"track_id": torch.arange(k) + 100,
                              "embedding": torch.arange(k, dtype=torch.float32)[:, None].repeat(1, 3)})


def test_labels_default_to_zeros_int64():
    d = make()
    assert d.labels.dtype == torch.int64 and torch.equal(d.labels, torch.zeros(4, dtype=torch.int64))
    assert len(d) == 4


def test_select_keeps_fields_aligned():
    d = make()
    for index in (torch.tensor([3, 1]), torch.tensor([False, True, False, True]), slice(1, 4, 2)):
        s = d.select(index)
        assert torch.equal(s.boxes[:, 0].long() + 100, s.extras["track_id"])
        assert torch.equal(s.boxes[:, 0], s.extras["embedding"][:, 0])
        assert torch.equal(s.scores, d.scores[index])
    assert torch.equal(d[torch.tensor([2])].extras["track_id"], torch.tensor([102]))


def test_rows_must_match_boxes():
    with pytest.raises(ValueError, match="scores"):
        Detections(torch.zeros(3, 7), torch.zeros(2))
    with pytest.raises(ValueError, match="uncertainty"):
        Detections(torch.zeros(3, 7), torch.zeros(3), extras={"uncertainty": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"\(K, 7\)"):
        Detections(torch.zeros(3, 5), torch.zeros(3))


def test_cat_keeps_the_extras_every_part_has():
    a = make(2)
    b = Detections(torch.ones(3, 7), torch.ones(3), torch.ones(3, dtype=torch.int64),
                   extras={"track_id": torch.arange(3)})
    c = Detections.cat([a, b])
    assert len(c) == 5 and set(c.extras) == {"track_id"}
    assert torch.equal(c.labels, torch.tensor([0, 0, 1, 1, 1]))
    assert torch.equal(c.extras["track_id"], torch.tensor([100, 101, 0, 1, 2]))
