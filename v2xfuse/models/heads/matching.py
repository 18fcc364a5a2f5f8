"""One-to-one assignment of predictions to ground truth (DETR's set loss) and its costs.

    cost (Q, M) --hungarian--> (rows (K,), cols (K,)), K = min(Q, M): the pairs of least total cost

The query head matches its Q queries to a map's M boxes with it (focal classification cost plus
L1 box cost, :func:`match_cost`), and QUEST matches received queries to the ego's (centre
distance, gated) the same way. ``scipy.optimize.linear_sum_assignment`` does the work on CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["hungarian", "focal_cost", "match_cost", "FORBIDDEN"]

#: the cost that stands for "never pair these" (scipy refuses infinities in a feasible problem)
FORBIDDEN = 1e6


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of least total cost.

    Args:
        cost: (Q, M) pairing costs; NaN and inf are read as :data:`FORBIDDEN`.
    Returns:
        (K,) int64 row indices ascending and (K,) int64 column indices, K = min(Q, M), on
        ``cost``'s device.
    """
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=cost.device)
        return empty, empty.clone()
    c = np.nan_to_num(cost.detach().to(torch.float64).cpu().numpy(), nan=FORBIDDEN,
                      posinf=FORBIDDEN, neginf=-FORBIDDEN)
    rows, cols = linear_sum_assignment(np.clip(c, -FORBIDDEN, FORBIDDEN))
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))


def focal_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(Q,) class logits -> (Q,) the focal loss of calling each query an object minus that of
    calling it background (Deformable DETR's classification cost: low for confident queries)."""
    p = torch.sigmoid(logits)
    pos = -alpha * (1 - p) ** gamma * torch.log(p + 1e-8)
    neg = -(1 - alpha) * p ** gamma * torch.log(1 - p + 1e-8)
    return pos - neg


def match_cost(logits: torch.Tensor, codes: torch.Tensor, gt_codes: torch.Tensor,
               cls_weight: float, reg_weight: float) -> torch.Tensor:
    """(Q, M) cost of pairing each query with each box.

    Args:
        logits: (Q,) class logits.
        codes, gt_codes: (Q, R) and (M, R) box codes compared by L1 (the loss's own code).
    """
    return cls_weight * focal_cost(logits)[:, None] + \
        reg_weight * torch.cdist(codes, gt_codes, p=1)
