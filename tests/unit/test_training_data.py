"""training/data.py: the validation subset."""
from __future__ import annotations

from torch.utils.data import Subset

from training.data import validation_subset

ITEMS = list(range(100, 110))  # any sequence works as a dataset here


def test_max_pairs_takes_a_seeded_subset_the_same_every_time():
    subset = validation_subset(ITEMS, 3, seed=0)
    assert isinstance(subset, Subset) and len(subset) == 3
    assert subset.indices == sorted(set(subset.indices))
    assert validation_subset(ITEMS, 3, seed=0).indices == subset.indices  # every epoch alike
    assert [subset[i] for i in range(3)] == [ITEMS[i] for i in subset.indices]
    others = {tuple(validation_subset(ITEMS, 3, seed=s).indices) for s in range(1, 6)}
    assert others - {tuple(subset.indices)}  # the seed decides


def test_null_or_a_cap_above_the_size_keeps_every_pair():
    assert validation_subset(ITEMS, None, seed=0) is ITEMS
    assert validation_subset(ITEMS, 10, seed=0) is ITEMS
    assert validation_subset(ITEMS, 500, seed=0) is ITEMS
