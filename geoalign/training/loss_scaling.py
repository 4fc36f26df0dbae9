"""The loss scaling that makes every distributed / accumulated set-up train on the global token-mean loss.

The loss of one optimiser step is the mean over every supervised token of the global batch (all ranks, all
accumulation micro-batches): sum of token losses / N_global. Each micro-batch's forward returns its token-loss sum
divided by N_global (Qwen's loss with ``num_items_in_batch=N_global``). Two averaging steps then act on the
gradient: DDP / ZeRO average it over the W ranks, and accelerate divides the loss by the A accumulation steps. So
each micro-batch loss is multiplied by W * A before backward, and the summed gradient is exactly that of the global
token-mean loss, however the batch is split (tested: 1 vs 2 processes give the same loss and gradient norm).
"""
from __future__ import annotations

from typing import Iterable

IGNORE_INDEX = -100


def supervised_tokens(micro_batches: Iterable[dict]) -> int:
    """Tokens that carry a loss in these micro-batches: labels after the causal shift (position 0 predicts nothing)
    that are not IGNORE_INDEX."""
    return sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)


def backward_scale(world_size: int, accumulation_steps: int) -> int:
    """The factor each micro-batch loss (already divided by the global token count) is multiplied by before
    backward: it undoes DDP's mean over ranks and accelerate's division by the accumulation steps."""
    if world_size < 1 or accumulation_steps < 1:
        raise ValueError(f"world_size and accumulation_steps must be >= 1, got {world_size}, {accumulation_steps}")
    return world_size * accumulation_steps
