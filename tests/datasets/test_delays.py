"""Per-collaborator delays the pipeline draws: fixed, uniform and the binomial protocol of the
CoBEVFlow / CoDynTrust evaluations (deterministic per seed, expected delay n * p)."""
import contextlib

import numpy as np
import pytest

from v2xfuse.datasets.pipeline import CoopSampler, PipelineConfig


class DelayRecorder:
    """Stands in for an adapter: ``load`` returns the delays it was asked for."""

    history_frames = 0
    skip_bad_frames = False

    def __len__(self):
        return 10_000

    def sample_errors(self, idx):
        return contextlib.nullcontext()

    def agent_ids(self, idx):
        return ["ego", "cav", "rsu"]

    def load(self, idx, delays):
        return delays


def _delays(seed, count=2000, **cfg):
    sampler = CoopSampler(DelayRecorder(), PipelineConfig(**cfg), train=False, seed=seed)
    return np.array([[d["cav"], d["rsu"]] for d in (sampler.load(i) for i in range(count))])


def test_binomial_delays_are_deterministic_per_seed_with_mean_n_p():
    a = _delays(0, delay_frames=10, delay_mode="binomial", delay_p=0.3)
    assert np.array_equal(a, _delays(0, delay_frames=10, delay_mode="binomial", delay_p=0.3))
    assert not np.array_equal(a, _delays(1, delay_frames=10, delay_mode="binomial", delay_p=0.3))
    # 4000 draws of Binomial(10, 0.3): mean 3 (std of the mean 0.023), variance 2.1
    assert abs(a.mean() - 3.0) < 0.1 and abs(a.var() - 2.1) < 0.25
    assert a.min() >= 0 and a.max() <= 10
    assert (a[:, 0] != a[:, 1]).any()  # each collaborator draws its own delay


def test_binomial_extremes_and_the_other_modes():
    assert (_delays(0, 50, delay_frames=10, delay_mode="binomial", delay_p=0.0) == 0).all()
    assert (_delays(0, 50, delay_frames=10, delay_mode="binomial", delay_p=1.0) == 10).all()
    assert (_delays(0, 50, delay_frames=3, delay_mode="fixed") == 3).all()
    uniform = _delays(0, 500, delay_frames=4, delay_mode="uniform")
    assert set(np.unique(uniform)) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="delay_mode"):
        PipelineConfig(delay_mode="poisson")
    with pytest.raises(ValueError, match="delay_p"):
        PipelineConfig.from_dict({"delay_mode": "binomial", "delay_frames": 10, "delay_p": 1.5})
