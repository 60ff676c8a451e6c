import pytest
import torch
from torch import nn

from senseflow.train import checkpoint as ckpt


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_round_trip_and_pruning(tmp_path):
    net = _net(0)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        ckpt.save_checkpoint(
            tmp_path, step, {"generator": net}, {"step": step, "opt": opt.state_dict()}, "a: 1\n", keep_last=2
        )
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30]
    other = _net(1)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), {"generator": other})
    assert state["step"] == 30
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt2 = torch.optim.AdamW(other.parameters())
    opt2.load_state_dict(state["opt"])
    torch.testing.assert_close(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert (ckpt.latest_checkpoint(tmp_path) / "config.yaml").read_text() == "a: 1\n"


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    net = _net(0)
    ckpt.save_checkpoint(tmp_path, 1, {"generator": net}, {"step": 1}, "", keep_last=3)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, {"generator": _net(5)}, {"step": 2}, "", keep_last=3)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    restored = _net(9)
    assert ckpt.load_checkpoint(latest, {"generator": restored})["step"] == 1
    torch.testing.assert_close(restored[0].weight, net[0].weight, rtol=0, atol=0)
    assert ckpt.clean_partial(tmp_path) == []  # the failed save removed its .partial itself


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, {"g": _net(0)}, {"v": 1}, "", keep_last=2)
    ckpt.save_checkpoint(tmp_path, 5, {"g": _net(1)}, {"v": 2}, "", keep_last=2)
    assert ckpt.load_checkpoint(tmp_path / "step-00000005", {"g": _net(2)})["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]


def test_errors_name_the_problem(tmp_path):
    (tmp_path / "step-00000003").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "step-00000003", {})
    ckpt.save_checkpoint(tmp_path, 4, {"g": _net(0)}, {}, "", keep_last=1)
    with pytest.raises(ValueError, match="no weights for \\['fake'\\]"):
        ckpt.load_checkpoint(tmp_path / "step-00000004", {"g": _net(0), "fake": _net(0)})
