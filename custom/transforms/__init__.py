"""MONAI transforms the bundle's pipelines reference.

* :mod:`custom.transforms.regions`: ``LabelToRegions(d)`` / ``RegionsToLabel(d)`` (labels <-> TC, WT, ET);
* :mod:`custom.transforms.io`: ``CheckedLoadImaged`` (checked loading, missing sequences zero-filled),
  ``SequenceNiftiWriter`` (the sequences used, in the written label's header);
* :mod:`custom.transforms.intensity`: ``ZeroBackground(d)``;
* :mod:`custom.transforms.brain_edge`: ``TrimBrainEdge(d)``, ``NormalizeBrainCore(d)`` (the brain's edge out of the input and its normalisation);
* :mod:`custom.transforms.augmentation`: ``SequenceDropoutd`` (random sequence dropout in training);
* :mod:`custom.transforms.thick_slices`: ``ThickSlices``, ``RandThickSlicesd`` (thick-slice acquisition simulated in training);
* :mod:`custom.transforms.crf`: ``DenseCRFd`` (fully connected 3D CRF post-processing).
"""

from custom.transforms.augmentation import SequenceDropoutd, usable_subsets
from custom.transforms.brain_edge import NormalizeBrainCore, NormalizeBrainCored, TrimBrainEdge, TrimBrainEdged
from custom.transforms.crf import DenseCRFd
from custom.transforms.intensity import ZeroBackground, ZeroBackgroundd
from custom.transforms.io import CheckedLoadImaged, SequenceNiftiWriter
from custom.transforms.regions import LabelToRegions, LabelToRegionsd, RegionsToLabel, RegionsToLabeld
from custom.transforms.thick_slices import RandThickSlicesd, ThickSlices

__all__ = [
    "CheckedLoadImaged", "DenseCRFd", "LabelToRegions", "LabelToRegionsd", "NormalizeBrainCore", "NormalizeBrainCored", "RegionsToLabel",
    "RandThickSlicesd", "RegionsToLabeld", "SequenceDropoutd", "SequenceNiftiWriter", "ThickSlices", "TrimBrainEdge", "TrimBrainEdged",
    "ZeroBackground", "ZeroBackgroundd", "usable_subsets",
]
