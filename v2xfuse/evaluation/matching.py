"""Greedy one-to-one matching of many frames at once, vectorised over frames and thresholds.

Both protocols match greedily: proposers in a fixed priority order each take the best item still
free among those whose IoU reaches the threshold (OpenCOOD: detections in score order take
ground-truth boxes; DAIR-V2X: ground-truth boxes in label order take predictions). A loop over
proposers decides one at a time; here every frame and threshold is decided together, in rounds:

* each undecided proposer points at its best free item (highest IoU >= threshold, ties by a
  per-edge key); one with none left is decided unmatched;
* a proposer is matched to the item it points at when no undecided proposer of higher
  priority could still take that item (it is the first, in priority order, of the undecided
  proposers with an edge to it).

Why this is the loop's result: an item next to an undecided proposer p is only ever taken by a
proposer of higher priority, and such proposers are decided before p takes anything they could
take; so when p is matched, every item p prefers is already gone to the same proposers as in the
loop, and the item p takes is one the loop leaves free for it. The first undecided proposer of
each frame is decided in every round, so the rounds end; on street scenes a few rounds do.
Only pairs of boxes that can overlap are scored (:func:`frame_edges`), a block of pairs at a time.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .geometry import PreparedBoxes, paired_ious, reach_overlaps

__all__ = ["candidate_pairs", "frame_edges", "greedy_match"]


def candidate_pairs(a: PreparedBoxes, counts_a: np.ndarray, b: PreparedBoxes,
                    counts_b: np.ndarray, max_pairs: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs of boxes of the same frame that are near enough in x to overlap, in blocks.

    Each frame's b-boxes are sorted by x, and each a-box is paired with those whose x lies
    within its half diagonal plus the largest b half diagonal: a superset of the pairs
    :func:`~v2xfuse.evaluation.geometry.reach_overlaps` accepts, found without visiting every
    pair of a frame (on a street scene about one pair in ten).

    Args:
        a, b: the boxes, frames one after another; counts_a, counts_b: (F,) boxes per frame.
        max_pairs: pairs per block; a block has at least one a-box with all its candidates, so
            it holds at most ``max(max_pairs, most candidates of one a-box)`` pairs.
    Yields:
        ``(ia, ib)``: (P,) int64 indices into a and b.
    """
    counts_a = np.asarray(counts_a, dtype=np.int64)
    counts_b = np.asarray(counts_b, dtype=np.int64)
    if len(a) == 0 or len(b) == 0:
        return
    frame_a = np.repeat(np.arange(len(counts_a)), counts_a)
    frame_b = np.repeat(np.arange(len(counts_b)), counts_b)
    by_x = np.lexsort((b.x, frame_b))
    # one sorted key per b-box, frames far apart: a window in key never spans two frames
    reach = a.radius + b.radius.max()
    span = 2.0 * (max(np.abs(a.x).max(), np.abs(b.x).max()) + reach.max()) + 1.0
    key_b = frame_b[by_x] * span + b.x[by_x]
    centre = frame_a * span + a.x
    slack = 1e-9 * (len(counts_a) * span)  # a generous bound on the keys' rounding
    lo = np.searchsorted(key_b, centre - reach - slack, side="left")
    width = np.searchsorted(key_b, centre + reach + slack, side="right") - lo
    ends = np.cumsum(width)
    first = 0
    while first < len(width):
        # rows [first, last) hold at most max_pairs pairs, and at least one row
        last = max(first + 1, int(np.searchsorted(ends, ends[first] - width[first] + max_pairs,
                                                  side="right")))
        w = width[first:last]
        ia = np.repeat(np.arange(first, last), w)
        offset = np.arange(int(w.sum())) - np.repeat(np.cumsum(w) - w, w)
        yield ia, by_x[np.repeat(lo[first:last], w) + offset]
        first = last


def frame_edges(boxes_a: np.ndarray, counts_a: np.ndarray, boxes_b: np.ndarray,
                counts_b: np.ndarray, iou_types: Sequence[str], min_iou: float,
                max_pairs: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The pairs of the same frame whose IoU reaches ``min_iou`` in at least one IoU type.

    Args:
        boxes_a: (A, 7) float64, frames concatenated; counts_a: (F,) boxes per frame.
        boxes_b: (B, 7) float64; counts_b: (F,).
        iou_types: "bev" and/or "3d".
        min_iou: > 0; pairs below it in every type are left out.
        max_pairs: pairs considered at once (see :func:`candidate_pairs`).
    Returns:
        ``(ia, ib, ious)``: (E,) indices and ``{iou_type: (E,) IoU}``, the values of
        ``ops.boxes_iou_bev`` / ``ops.boxes_iou_3d``; in no particular order.
    """
    prep_a, prep_b = PreparedBoxes(boxes_a), PreparedBoxes(boxes_b)
    found_a, found_b = [], []
    found = {t: [] for t in iou_types}
    for ia, ib in candidate_pairs(prep_a, counts_a, prep_b, counts_b, max_pairs):
        near = np.flatnonzero(reach_overlaps(prep_a, prep_b, ia, ib))
        ia, ib = ia[near], ib[near]
        ious = paired_ious(prep_a.take(ia), prep_b.take(ib), tuple(iou_types))
        keep = np.zeros(len(ia), dtype=bool)
        for values in ious.values():
            keep |= values >= min_iou
        found_a.append(ia[keep])
        found_b.append(ib[keep])
        for t, values in ious.items():
            found[t].append(values[keep])
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(found_a) if found_a else empty,
            np.concatenate(found_b) if found_b else empty,
            {t: np.concatenate(v) if v else np.zeros(0) for t, v in found.items()})


def greedy_match(proposer: np.ndarray, item: np.ndarray, iou: np.ndarray, tie: np.ndarray,
                 thresholds: Sequence[float], num_proposers: int) -> np.ndarray:
    """Greedy one-to-one matching at several thresholds (see the module docstring).

    Args:
        proposer: (E,) int64 proposer of each edge; a lower index is a higher priority. Only
            proposers of the same frame may share an item.
        item: (E,) int64 item of each edge.
        iou: (E,) float64; an edge counts at threshold t when ``iou >= t``.
        tie: (E,) int64; between edges of one proposer with equal IoU the lower key wins.
        thresholds: (T,) IoU thresholds.
        num_proposers: proposers in all (those without edges are unmatched).
    Returns:
        (T, num_proposers) int64: the item each proposer takes at each threshold, -1 for none.
    """
    num_t = len(thresholds)
    match = np.full(num_t * num_proposers, -1, dtype=np.int64)
    if len(iou) == 0 or num_t == 0:
        return match.reshape(num_t, num_proposers)
    num_items = int(item.max()) + 1
    # edges per threshold, as nodes of one graph: proposer t * num_proposers + p, item likewise
    level = [np.flatnonzero(iou >= thr) for thr in thresholds]
    t_of = np.repeat(np.arange(num_t), [len(e) for e in level])
    edges = np.concatenate(level)
    p_node = t_of * num_proposers + proposer[edges]
    i_node = t_of * num_items + item[edges]
    # each proposer's edges together, best first
    order = np.lexsort((tie[edges], -iou[edges], p_node))
    p_node, i_node = p_node[order], i_node[order]
    taken = np.zeros(num_t * num_items, dtype=bool)
    first_of_item = np.full(num_t * num_items, np.iinfo(np.int64).max)
    decided = np.zeros(num_t * num_proposers, dtype=bool)
    while len(p_node):
        free = ~taken[i_node]
        p_node, i_node = p_node[free], i_node[free]  # a proposer left without edges: unmatched
        if len(p_node) == 0:
            break
        head = np.empty(len(p_node), dtype=bool)
        head[0] = True
        np.not_equal(p_node[1:], p_node[:-1], out=head[1:])
        props, wants = p_node[head], i_node[head]
        first_of_item[i_node] = np.iinfo(np.int64).max
        np.minimum.at(first_of_item, i_node, p_node)
        win = first_of_item[wants] == props
        match[props[win]] = wants[win] - (props[win] // num_proposers) * num_items
        taken[wants[win]] = True
        decided[props[win]] = True
        undecided = ~decided[p_node]
        p_node, i_node = p_node[undecided], i_node[undecided]
    return match.reshape(num_t, num_proposers)
