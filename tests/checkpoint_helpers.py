"""Small networks and checkpoints for the checkpoint-integrity tests."""

from __future__ import annotations

import os
import shlex

import torch
from torch import nn

from senseflow.train import checkpoint as ckpt
from senseflow.train.sharded_checkpoint import ShardedCheckpointer


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def save_whole(root, step, seed=0, keep_last=5, hashes=True):
    return ckpt.save_checkpoint(
        root, step, {"generator": small_net(seed)}, {"iteration": step}, "a: 1\n", keep_last, hashes=hashes
    )


def trained_net(seed: int):
    net = small_net(seed)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    return net, opt


def save_dcp(root, step, net=None, opt=None, hashes=True):
    if net is None:
        net, opt = trained_net(step)
    saver = ShardedCheckpointer(root, keep_last=5, hashes=hashes)
    return saver.save(step, {"generator": net}, {"generator": opt}, {"iteration": step}, "a: 1\n")


def truncate_file(file, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


def flip_last_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)
