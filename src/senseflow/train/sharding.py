"""Small helpers for modules sharded in place by FSDP2 (``fully_shard``); no-ops for the others."""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule


def reshard(*modules: nn.Module) -> None:
    """Free the gathered weights FSDP2 may keep after a forward (the root's stay gathered until a
    backward), so that parameter-wise updates such as IDA see each rank's own shard."""
    for module in modules:
        if isinstance(module, FSDPModule):
            module.reshard()
