"""Training: the loss falls on a tiny model, and --resume ends on the same weights."""
import pytest
import torch

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.datasets import collate
from v2xfuse.engine.trainer import Trainer, load_checkpoint


def test_loss_decreases_on_a_fixed_batch(tiny_cfg):
    torch.manual_seed(0)
    model = build_detector(tiny_cfg)
    data = build_dataset(tiny_cfg, "train", train=False)
    batch = collate([data[0], data[1]])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        out = model(batch)
        loss = model.loss(out, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_resume_after_a_kill_ends_on_the_same_weights(tiny_cfg, tmp_path, monkeypatch):
    straight = Trainer(tiny_cfg, tmp_path / "straight", tensorboard=False, progress=False)
    straight.fit()
    expected = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]

    calls = {"n": 0}
    real_step = Trainer._step

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint of step 2 and one more step
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg, tmp_path / "resumed", tensorboard=False, progress=False).fit()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 2
    monkeypatch.setattr(Trainer, "_step", real_step)
    Trainer(tiny_cfg, tmp_path / "resumed", tensorboard=False, progress=False).fit(resume=True)
    got = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert got["step"] == 6
    for name, value in expected.items():
        assert torch.equal(got["model"][name], value), name
    assert (tmp_path / "resumed" / "config.yaml").is_file()
    assert (tmp_path / "resumed" / "results_val.json").is_file()


def test_a_persistent_loader_worker_trains_the_same_weights(tiny_cfg, tmp_path):
    # 3 training frames, batch 2: every step is a new epoch, so a worker that kept the first
    # epoch's augmentation (the epoch held as dataset state) would train other weights.
    in_process = Trainer(tiny_cfg, tmp_path / "main", tensorboard=False, progress=False)
    in_process.fit()
    cfg = {**tiny_cfg, "train": {**tiny_cfg["train"], "num_workers": 1}}
    Trainer(cfg, tmp_path / "worker", tensorboard=False, progress=False).fit()
    expected = load_checkpoint(tmp_path / "main" / "last.pt")["model"]
    got = load_checkpoint(tmp_path / "worker" / "last.pt")["model"]
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_the_epoch_in_the_key_changes_the_augmentation(tiny_cfg):
    data = build_dataset(tiny_cfg, "train", train=True, seed=3)
    first = [data[(0, 0)].points[0] for _ in range(2)]
    assert all(p.shape == first[0].shape and (p == first[0]).all() for p in first)
    assert data[0].points[0].shape == first[0].shape and (data[0].points[0] == first[0]).all()
    later = [data[(e, 0)].points[0] for e in range(1, 6)]
    assert any(p.shape != first[0].shape or not (p == first[0]).all() for p in later)
