"""The shared pieces of the training loops: schedule and epoch batch order (run/optimization.py)."""

import pytest
import torch

from medalign_platform.run.optimization import epoch_batches, warmup_cosine_lr
from medalign_platform.synthmed.expert_clip import _batches


def test_warmup_cosine_lr_values():
    assert warmup_cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 100, 1.0, 10) == 1.0                     # peak at warmup - 1
    assert warmup_cosine_lr(10, 100, 1.0, 10) == 1.0                    # cosine starts at the peak
    assert warmup_cosine_lr(55, 100, 2.0, 10) == pytest.approx(1.0)     # half way: half the peak
    assert warmup_cosine_lr(55, 100, 2.0, 10, floor=0.1) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert warmup_cosine_lr(500, 100, 2.0, 10, floor=0.1) == pytest.approx(0.2)  # clamped at the floor


def test_epoch_batches_are_a_deterministic_permutation_without_the_ragged_tail():
    batches = epoch_batches(10, 3, seed=4, epoch=1)
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(set(sum(batches, []))) == 9
    assert batches == epoch_batches(10, 3, seed=4, epoch=1)
    assert batches != epoch_batches(10, 3, seed=4, epoch=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_batches(2, 3, seed=0, epoch=0)


def test_epoch_batches_with_a_generator_draw_from_it():
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = epoch_batches(10, 5, seed=0, epoch=0, generator=a)
    assert first == [torch.randperm(10, generator=b).tolist()[:5], first[1]]
    assert epoch_batches(10, 5, seed=0, epoch=1, generator=a) != first   # the generator advanced


def _expert_clip_order_before_sharing(n, batch_size, steps, seed):
    """The expert CLIP's own orderer before it used epoch_batches (the prepared weights depend on it)."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + batch_size].tolist()
        pos += batch_size


@pytest.mark.parametrize("n, batch_size, steps", [(10, 3, 11), (12, 4, 9), (48, 20, 12)])
def test_expert_clip_batches_keep_their_order(n, batch_size, steps):
    got = list(_batches(n, batch_size, steps, seed=3))
    assert len(got) == steps
    assert got == list(_expert_clip_order_before_sharing(n, batch_size, steps, 3))
