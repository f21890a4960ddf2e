"""The brain's edge in skull-stripped input (``custom.transforms.brain_edge``): a series resampled once
more normalises like the original; millimetres, missing sequences and the 0 mm setting."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, NormalizeIntensity, NormalizeIntensityd, Spacingd
from scipy import ndimage as ndi

from custom.synthetic.fields import rotation
from custom.transforms import NormalizeBrainCore, NormalizeBrainCored, TrimBrainEdge, TrimBrainEdged


@pytest.fixture(scope="module")
def mni_brain() -> np.ndarray:
    """The MNI152 2009a T1 brain template that nilearn ships (real anatomy, 1 mm), 0 outside its brain
    (template > 0.2, nilearn's definition, holes filled): a skull-stripped series."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1 = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), np.float32)
    return np.where(ndi.binary_fill_holes(t1 > 0.2), t1, 0.0).astype(np.float32)


def _resampled_twice(img: np.ndarray, degrees: float = 12.0) -> np.ndarray:
    """``img`` rotated about its centre and back, trilinear each time: resampled twice, not moved."""
    r = rotation([degrees, 0.6 * degrees, 0.3 * degrees])
    c = (np.array(img.shape) - 1) / 2
    once = ndi.affine_transform(img, r, c - r @ c, order=1)
    return ndi.affine_transform(once, r.T, c - r.T @ c, order=1)


def _normalised(tmp_path, data: np.ndarray, edge_mm: float | None) -> np.ndarray:
    """``data`` (1 mm) through the bundle's steps (NIfTI written and loaded, 2 mm grid): the brain-edge
    transforms with ``edge_mm``, or (None) ``NormalizeIntensityd(nonzero=True)``; ``(H, W, D)``."""
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    steps = [LoadImaged("image", image_only=True, ensure_channel_first=True)]
    steps += [TrimBrainEdged("image", edge_mm)] if edge_mm is not None else []
    steps += [Spacingd("image", (2.0, 2.0, 2.0), mode="bilinear")]
    steps += [NormalizeBrainCored("image", edge_mm) if edge_mm is not None else NormalizeIntensityd("image", nonzero=True, channel_wise=True)]
    return Compose(steps)({"image": str(path)})["image"][0].numpy()


def test_a_series_resampled_again_normalises_closer_to_the_original(tmp_path, mni_brain):
    """Two trilinear resamplings add a partial-volume rim at the brain's edge (7 % more non-zero voxels).
    Z-scored over every non-zero voxel, the deep brain's mean normalised intensity moves by ~0.14; with the
    rim trimmed (2 mm) and the statistics taken 2 mm inside the brain, by about half that."""
    again = _resampled_twice(mni_brain)
    assert (again != 0).sum() > 1.05 * (mni_brain != 0).sum()
    shift = {}
    for edge_mm in (None, 2.0):
        a, b = _normalised(tmp_path, mni_brain, edge_mm), _normalised(tmp_path, again, edge_mm)
        deep = ndi.binary_erosion((a != 0) & (b != 0), iterations=3)
        shift[edge_mm] = abs(float(b[deep].mean() - a[deep].mean()))
    assert shift[None] > 0.1, shift
    assert shift[2.0] < 0.65 * shift[None], shift


def test_trim_is_in_millimetres_and_keeps_the_image():
    """2 mm off a box of 1 x 1 x 2 mm voxels: 2 voxels along the first two axes, 1 along the third; the
    MetaTensor (affine, meta) and every channel's zeros are kept; where the brain touches the image's border, or
    fills the image, it has no edge."""
    a = np.zeros((2, 20, 20, 12), np.float32)
    a[0, 4:16, 4:16, 2:10] = 1.0
    a[0, 0:16, 4:16, 2:10] = 1.0  # touches the border at index 0: no rim there
    x = MetaTensor(torch.as_tensor(a), affine=torch.as_tensor(np.diag([1.0, 1.0, 2.0, 1.0])), meta={"filename_or_obj": "case"})
    out = TrimBrainEdge(2.0)(x)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case"
    np.testing.assert_array_equal(out.affine.numpy(), x.affine.numpy())
    kept = np.argwhere(out[0].numpy() != 0)
    assert kept.min(0).tolist() == [0, 6, 3] and kept.max(0).tolist() == [13, 13, 8]
    assert not out[1].any()  # a missing sequence stays all zero
    assert TrimBrainEdge(0.0)(x) is x
    full = MetaTensor(torch.ones(1, 6, 6, 6))
    assert torch.equal(TrimBrainEdge(2.0)(full), full)
    with pytest.raises(ValueError, match="margin_mm must be >= 0"):
        TrimBrainEdge(-1.0)


def test_normalise_on_the_core():
    """0 mm is MONAI's NormalizeIntensity(nonzero, channel-wise); at 2 mm the statistics come from the voxels
    deeper than 2 mm (a dark rim does not move them), every non-zero voxel is normalised, zeros stay 0, and a
    channel that is all zero stays so."""
    rng = np.random.default_rng(1)
    a = np.zeros((3, 24, 24, 24), np.float32)
    a[:2, 4:20, 4:20, 4:20] = rng.normal(5.0, 1.0, (2, 16, 16, 16))
    rim = np.zeros((24, 24, 24), bool)
    rim[3:21, 3:21, 3:21] = True
    rim[4:20, 4:20, 4:20] = False
    a[0][rim] = 0.5  # a dark rim on channel 0 only
    x = MetaTensor(torch.as_tensor(a), affine=torch.eye(4))
    plain = NormalizeIntensity(nonzero=True, channel_wise=True)(x.clone())
    np.testing.assert_allclose(NormalizeBrainCore(0.0)(x.clone()).numpy(), plain.numpy(), atol=1e-6)
    out = NormalizeBrainCored("image", 2.0)({"image": x.clone()})["image"]
    core = np.zeros((24, 24, 24), bool)
    core[5:19, 5:19, 5:19] = True  # deeper than 2 mm inside the 18^3 brain (rim included)
    for c in (0, 1):
        v = a[c][core]
        np.testing.assert_allclose(out[c].numpy()[core], (v - v.mean()) / v.std(), atol=1e-4)
        assert np.array_equal(out[c].numpy() != 0, a[c] != 0)
    assert not out[2].any()
    assert out.dtype == torch.float32
