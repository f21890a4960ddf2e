"""Training-time augmentation that MONAI lacks: random sequence dropout.

``SequenceDropoutd`` zeroes whole input channels (sequences) of a normalised ``(4, H, W, D)``
image, so that one network segments any subset of T1, T1ce, T2, FLAIR that contains FLAIR or T2:
a missing sequence reaches the network as an all-zero channel, exactly as the loader
(``custom.transforms.CheckedLoadImaged``) fills it at inference. Place it last among the
intensity transforms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from custom.data import MODALITIES, REQUIRED_ANY


def usable_subsets() -> list[tuple[str, ...]]:
    """Every proper subset of ``MODALITIES`` (canonical order) that contains FLAIR or T2 (11 subsets)."""
    out = []
    for n in range(1, len(MODALITIES)):
        for combo in combinations(MODALITIES, n):
            if any(m in combo for m in REQUIRED_ANY):
                out.append(combo)
    return out


class SequenceDropoutd(RandomizableTransform, MapTransform):
    """With probability ``prob``, keep only a random subset of the sequences of ``keys`` (others -> 0).

    Image ``(4, H, W, D)`` in canonical order T1, T1ce, T2, FLAIR -> same shape. The subset is
    drawn from ``subsets`` (names from ``MODALITIES``; default :func:`usable_subsets`) with
    probabilities proportional to ``weights`` (default equal). Sequences already all-zero stay
    zero. The kept sequences are recorded in the data dict under ``sequences_key``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        subsets: Sequence[Sequence[str]] | None = None,
        weights: Sequence[float] | None = None,
        sequences_key: str = "sequences_used",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.subsets = [tuple(s) for s in (subsets if subsets is not None else usable_subsets())]
        for s in self.subsets:
            unknown = [m for m in s if m not in MODALITIES]
            if unknown or not s:
                raise ValueError(f"subset {s!r}: expected names from {MODALITIES}")
            if not any(m in s for m in REQUIRED_ANY):
                raise ValueError(f"subset {s!r} holds neither FLAIR nor T2: the network cannot segment it")
        w = np.ones(len(self.subsets)) if weights is None else np.asarray(weights, float)
        if w.shape != (len(self.subsets),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.subsets)} non-negative numbers, not all 0; got {weights!r}")
        self.p = w / w.sum()
        self.sequences_key = sequences_key
        self._subset: tuple[str, ...] = MODALITIES

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._subset = self.subsets[int(self.R.choice(len(self.subsets), p=self.p))] if self._do_transform else MODALITIES

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(MODALITIES):
                raise ValueError(f"{key}: expected {len(MODALITIES)} channels (T1, T1ce, T2, FLAIR), got {img.shape[0]}")
            if self._subset != MODALITIES:
                drop = [i for i, m in enumerate(MODALITIES) if m not in self._subset]
                img = img.clone()
                img[drop] = 0
                d[key] = img
        d[self.sequences_key] = ",".join(self._subset)
        return d
