"""What the ego holds after a channel round: one message's payload, checked, with its pose."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Received"]


@dataclass
class Received:
    """One message as the ego sees it after the channel (or passed straight through in training).

    Attributes:
        sample: index of the ego's sample in the batch.
        sender: stacked index of the sending agent in the batch.
        payload: the named tensors that arrived (decoded from bytes when a channel is used); for
            a message split into packets, one such dict per packet that arrived, in packet order.
        ego_from_sender: (4, 4) built from the pose the message carried (noisy if the channel
            or the data pipeline perturbed it).
        delay_us: age of the sender's observation, microseconds.
        timestamp_us: the message's timestamp (None when it did not cross a channel).
        packets: a split message: the indices of the packets in ``payload``; None otherwise.
        num_packets: a split message: how many packets were sent.
    """

    sample: int
    sender: int
    payload: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]
    ego_from_sender: torch.Tensor
    delay_us: int = 0
    timestamp_us: int | None = None
    packets: list[int] | None = None
    num_packets: int | None = None
