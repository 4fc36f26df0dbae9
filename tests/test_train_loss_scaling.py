"""geoalign.training.loss_scaling: the supervised-token count and the backward scale (the 1-vs-2-process
equivalence of the whole loop is tests/test_train_distributed.py)."""
from __future__ import annotations

import pytest
import torch

from geoalign.training.loss_scaling import IGNORE_INDEX, backward_scale, supervised_tokens


def test_supervised_tokens_skips_position_zero_and_ignored_labels():
    a = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]])
    b = torch.tensor([[1, IGNORE_INDEX, IGNORE_INDEX]])
    # after the shift: [6, -100, 7] -> 2 and [-100, 8, 9] -> 2; [-100, -100] -> 0. Position 0 never counts.
    assert supervised_tokens([{"labels": a}, {"labels": b}]) == 4
    assert supervised_tokens([{"labels": a}]) == 4  # 2 ignored positions after the shift: counting those gives 2
    assert supervised_tokens([{"labels": b}]) == 0
    assert supervised_tokens([]) == 0


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (1, 4), (8, 3)])
def test_backward_scale_undoes_both_averages(world, accum):
    """W ranks x A micro-batches each: DDP averages over W and accelerate divides each loss by A, so the scale
    must be W * A for the summed gradient to equal the global token-mean loss's gradient."""
    assert backward_scale(world, accum) == world * accum
    # a direct check of that claim with scalar "gradients": d/dx of sum_i (x * c_i / N) over all W*A micro-batches
    contributions = torch.arange(1.0, world * accum + 1)
    n_global = 10.0
    per_micro = contributions / n_global * backward_scale(world, accum)
    ddp_and_accum = per_micro.reshape(world, accum).div(accum).sum(1).mean()  # accelerate /A, DDP mean over ranks
    assert torch.isclose(ddp_and_accum, contributions.sum() / n_global)


def test_backward_scale_rejects_nonsense():
    with pytest.raises(ValueError, match="must be >= 1"):
        backward_scale(0, 1)
