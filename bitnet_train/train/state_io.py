"""How a checkpoint stores the model and optimizer: accelerate's state (DDP) or sharded
(torch.distributed.checkpoint, FSDP2). The trainer writes the rest (data, step, metadata).

    AccelerateStateIO  accelerate's save_state / load_state: model.safetensors, optimizer.bin
                       and per-rank RNG states (every rank holds the whole model)
    ShardedStateIO     DCP: every rank writes its own shards of the parameters and of the
                       AdamW states into DIR/model_optim/ (one file per rank plus .metadata);
                       no rank ever holds the whole model. Keys are parameter names
                       (transformers' layout), so DCP reshards on load: a checkpoint written
                       by W processes loads on any number of processes, and on one process
                       without a process group (the model then whole).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bitnet_train.errors import CheckpointError

log = logging.getLogger(__name__)

SHARDED_DIR = "model_optim"
ACCELERATE_MODEL = "model.safetensors"


class StateIO(Protocol):
    def save(self, directory: Path) -> None:
        """Write model + optimizer (+ RNG) states into `directory` (every rank calls it)."""

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (every rank calls it)."""


class AccelerateStateIO:
    """accelerate's save_state / load_state (the DDP and single-process format)."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def save(self, directory: Path) -> None:
        self.accelerator.save_state(str(directory))

    def load(self, directory: Path) -> None:
        if is_sharded_checkpoint(directory):
            raise CheckpointError(
                f"{directory} holds a sharded (FSDP2) checkpoint; resume it with "
                "parallel.strategy=fsdp2 (on any number of processes)")
        self.accelerator.load_state(str(directory))


def is_sharded_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a DCP model/optimizer state (written by ShardedStateIO)."""
    return (Path(directory) / SHARDED_DIR / ".metadata").is_file()


class ShardedStateIO:
    """torch.distributed.checkpoint of the model's and optimizer's (sharded) states."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": _plain(model_sd), "optim": optim_sd}

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(Path(directory) / SHARDED_DIR))

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not is_sharded_checkpoint(directory):
            found = "accelerate's state (DDP)" if (Path(directory) / ACCELERATE_MODEL).exists() \
                else "no model state"
            raise CheckpointError(
                f"{directory} holds {found}, not a sharded checkpoint; resume it with "
                "parallel.strategy=ddp, or start this run from its weights with "
                "model.init=<a final/ directory>")
        state = self._state()
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))  # in place
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        from bitnet_train.kernels.modules import mark_ternary_codes_stale
        from bitnet_train.train.ternary_all_gather import mark_scales_stale

        mark_ternary_codes_stale(self.model)  # weights were written behind the codes' back
        mark_scales_stale(self.model)


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """Parameters whose shards are ternary all-gather wrappers, as plain DTensors over the same
    storage (DCP writes and reads the bytes of plain tensors)."""
    from bitnet_train.train.ternary_all_gather import plain_dtensor

    return {k: plain_dtensor(v) for k, v in state.items()}
