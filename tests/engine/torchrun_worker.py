"""tools/train.py's ``main`` under torchrun, for tests/engine/test_distributed.py, with test hooks
chosen by environment variables:

* ``V2XFUSE_TEST_NO_BN=1``: every BatchNorm layer is frozen at its initial statistics, so that a
  sample's gradient does not depend on which others share its batch (what makes two ranks of
  batch B train the weights of one process of batch 2B; see the test).
* ``V2XFUSE_TEST_RECORD=DIR``: each rank appends to ``DIR/rank<r>.jsonl`` one line per optimizer
  step: the frames ("sequence/frame") of each of its micro-batches.
* ``V2XFUSE_TEST_DIE_AT=K``: every rank exits with status 3 when its K-th step of the session
  starts, after a barrier (so rank 0's checkpoint of the step before is on disk): a kill.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def without_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` (in place) with every BatchNorm layer kept in eval mode, normalising with its
    initial statistics (mean 0, variance 1) in training too: a learnt affine map per channel,
    the same for a sample whatever shares its batch. (An identity would not do: PointPillars
    folds its BatchNorm's parameters into its evaluation path.)"""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = types.MethodType(lambda self, mode=True: self, module)
    return model


def frames_of(batches) -> list[list[str]]:
    return [[f"{r.sequence}/{r.frame}" for r in b.frames] for b in batches]


def _hook_trainer() -> None:
    from v2xfuse.engine import trainer

    if os.environ.get("V2XFUSE_TEST_NO_BN"):
        build = trainer.build_detector
        trainer.build_detector = lambda cfg: without_batch_norm(build(cfg))
    record, die_at = os.environ.get("V2XFUSE_TEST_RECORD"), os.environ.get("V2XFUSE_TEST_DIE_AT")
    step, calls = trainer.Trainer._step, [0]

    def hooked(self, batches):
        calls[0] += 1
        if die_at and calls[0] == int(die_at):
            torch.distributed.barrier()
            os._exit(3)
        if record:
            with open(Path(record) / f"rank{self.world.rank}.jsonl", "a") as f:
                f.write(json.dumps(frames_of(batches)) + "\n")
        return step(self, batches)

    trainer.Trainer._step = hooked


def main() -> int:
    _hook_trainer()
    spec = importlib.util.spec_from_file_location("v2xfuse_tool_train", ROOT / "tools" / "train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
