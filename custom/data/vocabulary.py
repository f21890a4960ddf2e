"""The BraTS vocabulary: sequences, regions, label conventions and release layouts, defined once.

Sequences (network input channels 0..3, canonical order everywhere): ``MODALITIES`` = T1, T1ce (T1
post-contrast: t1c, t1gd), T2, FLAIR (t2f); ``SEQUENCE_ALIASES`` maps every release's file or
channel name onto them. Output regions (network output channels 0..2): ``REGIONS`` = TC (tumour
core: NCR + ET), WT (whole tumour: NCR + ED + ET), ET (enhancing tumour).

Layouts (``LAYOUTS``, by ``Layout.name``):

- ``brats2021``: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (BraTS 2018-2021 naming), labels
  1 NCR (necrotic tumour core), 2 ED (peritumoral oedema), 4 ET (enhancing tumour);
- ``brats2023``: ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (BraTS 2023+ GLI and the other
  sub-challenges with this naming), labels 1 NCR, 2 ED, 3 ET;
- ``msd``: Medical Segmentation Decathlon Task01_BrainTumour: ``dataset.json``, 4D
  ``imagesTr/*.nii.gz`` (H, W, D, 4) with channels FLAIR, T1w, t1gd, T2w (``MSD_CHANNELS``; a
  folder's ``dataset.json`` may say otherwise), labels 1 oedema, 2 non-enhancing tumour, 3 enhancing
  tumour; ``imagesTs`` holds the unlabelled cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES = ("t1", "t1ce", "t2", "flair")
REQUIRED_ANY = ("flair", "t2")
"""A case must hold at least one of these sequences (the model accepts any subset of ``MODALITIES``
that contains one of them); the others may be missing."""
REFERENCE_ORDER = ("t1ce", "flair", "t1", "t2")
"""The reference series of a clinical study (the one the others are registered to, the brain extracted on and the
labels written on): the first of these it holds. A T1 comes before the T2, since the brain-extraction atlas is
T1-weighted (``benchmarks/results/preparation_n4_3_levels.md``, notes)."""

SEQUENCE_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
REGIONS = ("TC", "WT", "ET")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEQUENCE_ALIASES = {
    "t1": "t1", "t1n": "t1", "t1w": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
}
"""File-name suffix or channel name of any release (lower case) -> sequence of ``MODALITIES``."""
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")
"""The channels of an MSD Task01 4D image, in file order (FLAIR, T1w, t1gd, T2w)."""


@dataclass(frozen=True)
class LabelConvention:
    """Integer label values of one release's segmentation files.

    ``ncr`` is the necrotic core (MSD: the non-enhancing tumour), ``ed`` the oedema and ``et`` the
    enhancing tumour; 0 is background in every convention.
    """

    name: str
    ncr: int
    ed: int
    et: int
    names: dict[int, str] = field(compare=False)

    @property
    def values(self) -> tuple[int, ...]:
        return (0, self.ncr, self.ed, self.et)

    @property
    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """Label values making up each region of ``REGIONS``."""
        return {"TC": (self.ncr, self.et), "WT": (self.ncr, self.ed, self.et), "ET": (self.et,)}


CONVENTIONS = {
    "brats2021": LabelConvention(
        "brats2021", ncr=1, ed=2, et=4, names={1: "necrotic tumour core", 2: "peritumoral oedema", 4: "enhancing tumour"}
    ),
    "brats2023": LabelConvention(
        "brats2023", ncr=1, ed=2, et=3, names={1: "necrotic tumour core", 2: "peritumoral oedema", 3: "enhancing tumour"}
    ),
    "msd": LabelConvention("msd", ncr=2, ed=1, et=3, names={1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}),
}


@dataclass(frozen=True)
class Layout:
    """A release layout: how its files are named, its label convention, its channel order."""

    name: str
    suffixes: tuple[str, ...]  # file-name suffixes of T1, T1ce, T2, FLAIR, seg (per-modality layouts)
    separator: str  # between case id and suffix
    channel_index: tuple[int, ...] = (0, 1, 2, 3)  # loaded channel order -> canonical order

    @property
    def convention(self) -> LabelConvention:
        return CONVENTIONS[self.name]


LAYOUTS = {
    "brats2021": Layout("brats2021", ("t1", "t1ce", "t2", "flair", "seg"), "_"),
    "brats2023": Layout("brats2023", ("t1n", "t1c", "t2w", "t2f", "seg"), "-"),
    "msd": Layout("msd", (), "", channel_index=tuple(MSD_CHANNELS.index(m) for m in MODALITIES)),
}


def describe_sequences(sequences) -> str:
    """``('t1ce', 'flair')`` -> ``'T1ce, FLAIR'``."""
    return ", ".join(SEQUENCE_NAMES.get(m, m) for m in sequences)


def strip_nifti_suffix(name: str) -> str | None:
    """File name without ``.nii.gz``/``.nii``, or None for a non-NIfTI name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def default_reference(sequences) -> str:
    """The reference series of a study with ``sequences`` (names of ``MODALITIES``): the first of
    :data:`REFERENCE_ORDER` among them. Raises ``StopIteration`` if none is."""
    return next(s for s in REFERENCE_ORDER if s in sequences)
