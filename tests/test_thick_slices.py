"""Thick-slice acquisition simulated in training (custom.transforms.thick_slices) on real tensors and train.json."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from custom.transforms import RandThickSlicesd, ThickSlices


def _brain(voxel_mm: float = 2.0) -> MetaTensor:
    """(2, 24, 24, 24): a brain block (zero outside), 1 below slice 12 along axis 2 and 3 from it on."""
    img = torch.zeros(2, 24, 24, 24)
    img[:, 2:22, 2:22, 2:12] = 1.0
    img[:, 2:22, 2:22, 12:22] = 3.0
    return MetaTensor(img, affine=torch.diag(torch.tensor([voxel_mm, voxel_mm, voxel_mm, 1.0])))


def _ramp_width(profile: torch.Tensor) -> int:
    """Voxels strictly between the two tissue values 1 and 3 along a profile."""
    return int(((profile > 1.001) & (profile < 2.999)).sum())


def test_slices_blur_across_their_axis_only_and_keep_the_background():
    img = _brain(2.0)
    out = ThickSlices()(img, [2, None], [6.0, 0.0])
    assert isinstance(out, MetaTensor) and out.shape == img.shape
    assert _ramp_width(img[0, 12, 12]) == 0 and _ramp_width(out[0, 12, 12]) >= 3  # across the slices: a ramp
    assert torch.equal(out[0, :, 12, 16], img[0, :, 12, 16])  # in-plane: as sharp as before
    assert torch.equal(out[1], img[1])  # channel without an axis: untouched
    assert torch.all(out[0][img[0] == 0] == 0)  # outside the brain stays zero
    inner = (slice(2, 22), slice(2, 22), slice(5, 19))  # away from the brain's edge across the slices
    assert abs(out[0][inner].mean() - img[0][inner].mean()) < 0.05  # slice means keep the intensity


def test_thickness_is_in_mm_of_the_image_voxels():
    """6 mm is 6 voxels of 1 mm but 2 voxels of 3 mm; no thicker than a voxel changes nothing."""
    fine = ThickSlices()(_brain(1.0), [2, 2], [6.0, 1.0])
    coarse = ThickSlices()(_brain(3.0), [2, 2], [6.0, 3.0])
    assert _ramp_width(fine[0, 12, 12]) > _ramp_width(coarse[0, 12, 12]) >= 1
    assert torch.equal(fine[1], _brain(1.0)[1]) and torch.equal(coarse[1], _brain(3.0)[1])


def test_random_slices_per_channel_labels_untouched():
    t = RandThickSlicesd("image", prob=1.0, channel_prob=0.5, thickness_mm=(3.0, 6.0))
    t.set_random_state(0)
    label = torch.zeros(1, 24, 24, 24)
    label[0, 8:16, 8:16, 8:16] = 1
    changed = torch.zeros(2)
    for _ in range(40):
        out = t({"image": _brain(2.0), "label": label.clone()})
        assert torch.equal(out["label"], label)
        changed += (out["image"] != _brain(2.0)).flatten(1).any(1).float()
    assert 8 < changed[0] < 32 and 8 < changed[1] < 32  # each channel on its own, about half of the draws
    never = RandThickSlicesd("image", prob=0.0)
    assert torch.equal(never({"image": _brain(2.0)})["image"], _brain(2.0))


@pytest.mark.parametrize("kwargs", [{"channel_prob": 1.5}, {"thickness_mm": (6.0, 3.0)}, {"thickness_mm": (0.0, 3.0)}])
def test_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RandThickSlicesd("image", **kwargs)


def test_bad_axis_and_shape_are_refused():
    with pytest.raises(ValueError, match="axis"):
        ThickSlices()(_brain(), [3, None], [5.0, 0.0])
    with pytest.raises(ValueError, match="one axis and one thickness per channel"):
        ThickSlices()(_brain(), [2], [5.0])


def test_train_json_wires_thick_slice_prob():
    parser = ConfigParser()
    parser.read_config("bundle/configs/train.json")
    parser["thick_slice_prob"] = 0.7
    parser["layout"] = "$brats.LAYOUTS['brats2021']"
    found = [t for t in parser.get_parsed_content("train#random_transforms") if isinstance(t, RandThickSlicesd)]
    assert len(found) == 1 and found[0].prob == 0.7
