"""Step sampler (exact data position on resume, sharding) and checkpoint RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vopd.checkpoint import _to_plain, restore_rng, rng_state
from vopd.data import StepSampler


def _sampler(**kw):
    base = dict(prompts_per_step=4, micro_batch=2, seed=3, num_steps=6)
    base.update(kw)
    return StepSampler(10, **base)


def test_every_prompt_once_per_epoch_then_reshuffled():
    s = _sampler()
    first_epoch = [i for step in range(2) for i in s.step_indices(step)] + s.step_indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    second = s.step_indices(2)[2:] + s.step_indices(3) + s.step_indices(4)
    assert sorted(second) == list(range(10))
    assert first_epoch != second[:10]


def test_resume_start_step_continues_the_same_order():
    full = list(_sampler())
    resumed = list(_sampler(start_step=2))
    per_step = _sampler().micro_batches_per_step()
    assert per_step == 2
    assert resumed == full[2 * per_step :]
    assert len(_sampler(start_step=2)) == len(resumed)


def test_shards_cover_the_step_without_overlap():
    shards = [list(_sampler(rank=r, world_size=2)) for r in range(2)]
    for step in range(6):
        got = sorted(shards[0][step] + shards[1][step])  # one micro-batch of 2 per rank per step
        assert got == sorted(_sampler().step_indices(step))


def test_bad_sharding_and_empty_data_rejected():
    with pytest.raises(ValueError, match="divide"):
        StepSampler(10, prompts_per_step=3, micro_batch=1, seed=0, num_steps=1, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        StepSampler(0, prompts_per_step=2, micro_batch=1, seed=0, num_steps=1)


def test_rng_state_round_trips_through_plain_types():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    saved = _to_plain(rng_state())
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng(saved)
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], want[0])
    assert got[1:] == want[1:]
