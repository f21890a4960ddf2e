"""Random sequence dropout (custom.transforms.augmentation.SequenceDropoutd) on real tensors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from custom.data import MODALITIES
from custom.transforms.augmentation import SequenceDropoutd, usable_subsets


def _image() -> torch.Tensor:
    return torch.stack([torch.full((5, 4, 3), float(c + 1)) for c in range(4)])  # channel c holds c + 1


def test_usable_subsets_are_the_eleven_proper_subsets_with_flair_or_t2():
    subsets = usable_subsets()
    assert len(subsets) == 11 and len(set(subsets)) == 11
    assert all(("flair" in s or "t2" in s) and s != MODALITIES for s in subsets)
    assert all(list(s) == sorted(s, key=MODALITIES.index) for s in subsets)


def test_dropped_sequences_are_exact_zeros_and_kept_ones_unchanged():
    t = SequenceDropoutd("image", prob=1.0)
    t.set_random_state(0)
    seen = Counter()
    for _ in range(300):
        out = t({"image": _image(), "label": torch.ones(1, 5, 4, 3)})
        kept = tuple(out["sequences_used"].split(","))
        seen[kept] += 1
        for c, m in enumerate(MODALITIES):
            expected = float(c + 1) if m in kept else 0.0
            assert torch.all(out["image"][c] == expected)
        assert torch.all(out["label"] == 1)
    assert set(seen) == set(usable_subsets())  # every subset drawn, never all four at prob 1


def test_probability_and_weights():
    subsets = [("t1ce", "flair"), ("flair",)]
    t = SequenceDropoutd("image", prob=0.5, subsets=subsets, weights=[3, 1])
    t.set_random_state(1)
    counts = Counter(t({"image": _image()})["sequences_used"] for _ in range(2000))
    assert abs(counts["t1,t1ce,t2,flair"] / 2000 - 0.5) < 0.05
    assert abs(counts["t1ce,flair"] / (counts["t1ce,flair"] + counts["flair"]) - 0.75) < 0.05


def test_refuses_what_the_network_cannot_use():
    with pytest.raises(ValueError, match="neither FLAIR nor T2"):
        SequenceDropoutd("image", subsets=[("t1", "t1ce")])
    with pytest.raises(ValueError, match="expected names"):
        SequenceDropoutd("image", subsets=[("pd",)])
    with pytest.raises(ValueError, match="weights"):
        SequenceDropoutd("image", subsets=[("flair",)], weights=[1, 2])
    with pytest.raises(ValueError, match="4 channels"):
        SequenceDropoutd("image", prob=1.0)({"image": torch.zeros(3, 2, 2, 2)})
