"""geoalign.training.sampler: StepSampler's data order (the same samples in every optimizer step whatever the
number of ranks; a resume starts exactly where the run stopped)."""
from __future__ import annotations

from geoalign.training.sampler import StepSampler


def test_step_sampler_partitions_global_batches():
    kw = dict(global_batch=8, per_device=2, seed=3, start_step=0, total_steps=5)
    one = list(StepSampler(13, world=1, rank=0, **kw))
    two = [list(StepSampler(13, world=2, rank=r, **kw)) for r in range(2)]
    assert all(len(b) == 2 for b in one) and len(one) == 5 * 4
    for step in range(5):           # same samples in every optimizer step, whatever the number of ranks
        a = sorted(i for b in one[step * 4:(step + 1) * 4] for i in b)
        b = sorted(i for r in range(2) for mb in two[r][step * 2:(step + 1) * 2] for i in mb)
        assert a == b
    first_epoch = sorted(i for b in one[:8] for i in b)     # 2 steps/epoch: 16 slots, 13 samples + 3 wrapped
    assert set(first_epoch) == set(range(13))
    resumed = list(StepSampler(13, world=1, rank=0, **dict(kw, start_step=3)))
    assert resumed == one[12:]
