"""The dense CRF post-processing transform (custom.transforms.crf.DenseCRFd) on small synthetic volumes."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch
from conftest import REPO, write_toy_dataset
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import AsDiscreted
from scipy import ndimage as ndi

from custom.transforms import RegionsToLabeld
from custom.transforms.crf import DenseCRFd, classes_to_regions, crf_voxel_mask, regions_to_classes

# The post-processing entry of bundle/configs/inference.json and evaluate.json (between Activationsd and Invertd).
CRF_COMPONENT = {
    "_target_": "custom.transforms.crf.DenseCRFd",
    "_disabled_": "$not monai.utils.str2bool(@use_crf)",
    "keys": "pred",
    "image_key": "image",
}


def make_case(shape=(64, 64, 48), spacing=(2.0, 2.0, 2.0), specks=True, seed=0, noise=0.15, origin=(10.0, -20.0, 5.0), signs=(1, 1, 1)):
    """A brain-like ellipsoid with one spherical tumour (ED shell, ET rim, NCR centre) and
    matching contrast in the four z-scored channels (T1, T1ce, T2, FLAIR); the prediction is the
    clean segmentation as probabilities ``sigmoid(1.5 * signed distance in mm)`` plus, optionally,
    three 2x2x2-voxel false-positive specks (p = 0.9) in normal tissue >= 25 mm from the tumour.

    Returns ``pred`` (3, H, W, D) and ``image`` (4, H, W, D) MetaTensors (affine = diag(signs *
    spacing) + origin), the true region masks (3, H, W, D), the specks' index slices and the brain mask.
    """
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    shape = tuple(shape)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)], indexing="ij"))
    ext = np.array(shape) * sp
    brain = ((grid / (0.46 * ext)[:, None, None, None]) ** 2).sum(0) <= 1
    r = np.sqrt(((grid - np.array([-0.22 * ext[0], 0.0, 0.0])[:, None, None, None]) ** 2).sum(0))
    wt, tc, ncr = (r <= 13) & brain, (r <= 8) & brain, (r <= 4.5) & brain
    et = tc & ~ncr
    regions = np.stack([tc, wt, et])  # REGIONS order: TC, WT, ET
    img = np.zeros((4,) + shape, np.float32) + np.array([0.3, 0.2, -0.3, -0.2], np.float32)[:, None, None, None]
    for m, v in ((wt & ~tc, (-0.5, -0.3, 1.8, 2.0)), (et, (0.2, 2.5, 0.8, 1.0)), (ncr, (-1.5, -1.0, 2.6, 0.5))):
        img[:, m] = np.array(v, np.float32)[:, None]
    img += noise * rng.standard_normal(img.shape).astype(np.float32)
    img[:, ~brain] = 0
    logits = np.empty(regions.shape, np.float32)
    for k in range(3):
        signed = ndi.distance_transform_edt(regions[k], sampling=sp) - ndi.distance_transform_edt(~regions[k], sampling=sp)
        logits[k] = np.clip(1.5 * signed, -15, 15)
    speck_slices = []
    if specks:
        # a WT speck, a WT+TC speck and a WT+TC+ET speck, far from the tumour, in normal tissue
        for n_regions, f in ((1, (0.25, 0.0, 0.0)), (2, (0.1, 0.25, 0.1)), (3, (0.0, -0.25, -0.15))):
            v = np.round(np.array(f) * ext / sp + (np.array(shape) - 1) / 2).astype(int)
            sl = tuple(slice(int(a), int(a) + 2) for a in v)
            assert brain[sl].all() and r[sl].min() >= 25
            for ch in (1, 0, 2)[:n_regions]:
                logits[ch][sl] = np.log(9.0)
            speck_slices.append(sl)
    probs = 1.0 / (1.0 + np.exp(-logits))
    affine = np.diag([*(np.asarray(signs) * sp), 1.0])
    affine[:3, 3] = origin
    pred = MetaTensor(torch.from_numpy(probs.astype(np.float32)), affine=torch.from_numpy(affine))
    image = MetaTensor(torch.from_numpy(img), affine=torch.from_numpy(affine))
    return pred, image, regions, speck_slices, brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def as_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.fixture(scope="module")
def speck_case():
    return make_case()


def test_conversion_regions_classes_roundtrip():
    rng = np.random.default_rng(0)
    regions = rng.uniform(0, 1, (3, 5, 4, 3)).astype(np.float32)  # arbitrary, not nested
    classes = regions_to_classes(regions)
    assert classes.shape == (4, 5, 4, 3)
    assert classes.min() >= 0 and np.allclose(classes.sum(0), 1.0, atol=1e-6)
    back = classes_to_regions(classes)
    et = regions[2]
    tc = np.maximum(regions[0], et)
    wt = np.maximum(regions[1], tc)
    np.testing.assert_allclose(back, np.stack([tc, wt, et]), atol=1e-6)  # nesting enforced, else unchanged


def test_specks_removed_tumour_kept(speck_case):
    pred, image, regions, specks, brain = speck_case
    p0 = as_np(pred)
    assert all((p0[:, s[0], s[1], s[2]] > 0.5).any(axis=0).all() for s in specks)  # the specks are predicted
    crf = DenseCRFd("pred", image_key="image")
    out = crf({"pred": pred, "image": image})["pred"]
    p = as_np(out) > 0.5
    for s in specks:
        assert not p[:, s[0], s[1], s[2]].any(), "a false-positive speck survived the CRF"
    for k in range(3):
        assert dice(p[k], regions[k]) >= 0.99
    # the CRF ran on the voxels of crf_voxel_mask (default margin: 3 x 10 mm)
    lin = np.asarray(image.affine)[:3, :3]
    info = crf.last_info["pred"]
    assert 0 < info["voxels"] == crf_voxel_mask(p0, brain, lin, 0.5, 30.0).sum() <= brain.sum()


def test_one_box_per_component(speck_case):
    """Cost: each connected component gets its own box, instead of one box around the tumour and
    the specks (shown with a 10 mm margin: the 64 x 64 x 48 test brain is small)."""
    pred, image, _, _, brain = speck_case
    p0, lin = as_np(pred), np.asarray(image.affine)[:3, :3]
    mask = crf_voxel_mask(p0, brain, lin, 0.5, 10.0)
    idx = np.argwhere(p0.max(0) > 0.5)
    grow = np.ceil(10.0 / np.diag(lin)).astype(int)
    lo, hi = np.maximum(idx.min(0) - grow, 0), idx.max(0) + grow + 1
    one_box = np.zeros_like(brain)
    one_box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    assert mask.sum() < 0.5 * (one_box & brain).sum()
    assert mask[tuple(np.argwhere(p0.max(0) > 0.5).T)].all()  # every candidate voxel is covered


def test_output_type_meta_and_downstream_chain(speck_case):
    pred, image, regions, _, _ = speck_case
    d = DenseCRFd("pred")({"pred": pred, "image": image})
    out = d["pred"]
    assert isinstance(out, MetaTensor) and out.shape == pred.shape and out.dtype == pred.dtype
    assert torch.allclose(out.affine, pred.affine)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    o = as_np(out)
    assert (o[0] <= o[1] + 1e-6).all() and (o[2] <= o[0] + 1e-6).all()  # nested: ET <= TC <= WT
    d = RegionsToLabeld("pred", convention="brats2021")(AsDiscreted("pred", threshold=0.5)(d))
    label = as_np(d["pred"])[0]
    expected = np.zeros(label.shape, np.uint8)
    expected[regions[1]] = 2
    expected[regions[0]] = 1
    expected[regions[2]] = 4
    assert (label == expected).mean() > 0.999


def test_clean_segmentation_kept():
    pred, image, regions, _, _ = make_case(specks=False, seed=1)
    out = as_np(DenseCRFd("pred")({"pred": pred, "image": image})["pred"]) > 0.5
    for k in range(3):
        assert dice(out[k], regions[k]) >= 0.99, f"region {k}"


@pytest.mark.parametrize("noise", [0.0, 0.15])
@pytest.mark.parametrize("shape, params", [((96, 96, 64), {}), ((64, 64, 48), {"theta_bilateral_mm": 5.0})])
def test_crop_matches_full_volume(shape, params, noise):
    """Cropped (default) and full-brain runs give the same labels. With noisy probabilities a voxel
    whose refined probability is a near tie (within 0.1 of 0.5) may still flip: the kernel
    normalisation of the voxels at a box edge differs slightly from the full run's."""
    pred, image, _, _, brain = make_case(shape=shape, seed=4)
    rng = np.random.default_rng(3)
    p0 = as_np(pred)
    noisy = np.clip(p0 + rng.normal(0, noise, p0.shape).astype(np.float32) * (p0 > 0.05), 0, 1)
    noisy_pred = MetaTensor(torch.from_numpy(noisy), affine=pred.affine)
    cropped, full = DenseCRFd("pred", crop=True, **params), DenseCRFd("pred", crop=False, **params)
    a = as_np(cropped({"pred": noisy_pred, "image": image})["pred"])
    b = as_np(full({"pred": noisy_pred, "image": image})["pred"])
    assert cropped.last_info["pred"]["voxels"] < 0.8 * full.last_info["pred"]["voxels"]
    assert full.last_info["pred"]["voxels"] == brain.sum()
    if noise == 0:
        np.testing.assert_array_equal(a > 0.5, b > 0.5)
    else:
        differ = (a > 0.5) != (b > 0.5)
        assert not differ[np.abs(b - 0.5) > 0.1].any()
        assert differ.sum() <= 1e-5 * differ.size
        assert np.abs(a - b).max() < 0.1
    # outside the CRF voxels the prediction is left exactly as it was
    margin = 3.0 * params.get("theta_bilateral_mm", 10.0)
    mask = crf_voxel_mask(noisy, brain, np.asarray(image.affine)[:3, :3], 0.5, margin)
    assert cropped.last_info["pred"]["voxels"] == mask.sum()
    np.testing.assert_array_equal(a[:, ~mask], noisy[:, ~mask])


def test_anisotropic_spacing():
    pred, image, regions, specks, brain = make_case(shape=(80, 80, 24), spacing=(1.5, 1.5, 4.0), seed=2, signs=(-1, -1, 1))
    crf = DenseCRFd("pred")
    refined = as_np(crf({"pred": pred, "image": image})["pred"])
    out = refined > 0.5
    # the spacing comes from the affine (LPS-like, negative diagonal): the same as passing it explicitly...
    plain = {"pred": as_np(pred), "image": as_np(image)}
    np.testing.assert_allclose(DenseCRFd("pred", spacing=(1.5, 1.5, 4.0))(plain)["pred"], refined, atol=1e-5)
    # ...and it matters: with uncertain probabilities an isotropic guess gives other results
    soft = {"pred": 0.3 + 0.4 * plain["pred"], "image": plain["image"]}
    right = DenseCRFd("pred", spacing=(1.5, 1.5, 4.0))(soft)["pred"]
    assert np.abs(DenseCRFd("pred", spacing=(1.5, 1.5, 1.5))(soft)["pred"] - right).max() > 0.05
    for s in specks:
        assert not out[:, s[0], s[1], s[2]].any()
    for k in range(3):
        assert dice(out[k], regions[k]) >= 0.99
    # the margin is in mm on every axis: a one-voxel tumour grows by ceil(30 mm / spacing) voxels per side
    one = np.zeros((3, 80, 80, 24), np.float32)
    one[:, 40, 40, 12] = 0.9
    mask = crf_voxel_mask(one, np.ones((80, 80, 24), bool), np.diag([1.5, 1.5, 4.0]), 0.5, 30.0)
    extent = [int(np.ptp(np.nonzero(mask)[ax])) + 1 for ax in range(3)]
    assert extent == [2 * 20 + 1, 2 * 20 + 1, 2 * 8 + 1]


def test_no_tumour_returns_unchanged_at_once(monkeypatch):
    pred, image, _, _, _ = make_case(specks=False)
    low = MetaTensor(torch.full(pred.shape, 0.2), affine=pred.affine)
    import pydensecrf.densecrf as dcrf

    def boom(*a, **k):
        raise AssertionError("no CRF should be built without a predicted tumour")

    monkeypatch.setattr(dcrf, "DenseCRF", boom)
    crf = DenseCRFd("pred")
    t0 = time.perf_counter()
    d = crf({"pred": low, "image": image})
    assert time.perf_counter() - t0 < 2.0
    assert d["pred"] is low
    assert crf.last_info["pred"]["voxels"] == 0


def test_plain_arrays_need_spacing(speck_case):
    pred, image, regions, _, _ = speck_case
    data = {"pred": as_np(pred), "image": as_np(image)}
    with pytest.raises(ValueError, match="spacing"):
        DenseCRFd("pred")(data)
    out = DenseCRFd("pred", spacing=(2.0, 2.0, 2.0))(data)["pred"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert dice(out[1] > 0.5, regions[1]) >= 0.99


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p, i: (p[:, :-1], i), r"spatial shapes differ: 'pred' \(3, 63, 64, 48\) vs 'image' \(4, 64, 64, 48\)"),
        (lambda p, i: (p[:2], i), r"'pred' must be region probabilities of shape \(3, H, W, D\).*\(2, 64, 64, 48\)"),
        (lambda p, i: (p, i[:3]), r"'image' must be an image of shape \(4, H, W, D\).*\(3, 64, 64, 48\)"),
        (lambda p, i: (p[None], i), r"'pred' must be region probabilities.*\(1, 3, 64, 64, 48\)"),
        (lambda p, i: (p * 3.0, i), r"'pred' \(shape \(3, 64, 64, 48\)\) must hold probabilities in \[0, 1\]"),
        (lambda p, i: (p - 0.5, i), r"must hold probabilities in \[0, 1\]"),
        (lambda p, i: (_set(p, np.nan), i), r"'pred' \(shape \(3, 64, 64, 48\)\) contains 1 NaN or infinite"),
        (lambda p, i: (p, _set(i, np.inf)), r"'image' \(shape \(4, 64, 64, 48\)\) contains 1 NaN or infinite"),
        (lambda p, i: (p, MetaTensor(i.as_tensor(), affine=torch.diag(torch.tensor([3.0, 2.0, 2.0, 1.0])))), r"different affines"),
    ],
)
def test_errors(speck_case, change, match):
    pred, image, _, _, _ = speck_case
    p, i = change(pred.clone(), image.clone())
    with pytest.raises(ValueError, match=match):
        DenseCRFd("pred")({"pred": p, "image": i})


def _set(t, value):
    t = t.clone()
    t[(0,) * t.ndim] = value
    return t


def test_missing_image_key_and_bad_arguments(speck_case):
    pred, _, _, _, _ = speck_case
    with pytest.raises(ValueError, match=r"image key 'img' is missing from the data \(keys: \['pred'\]\)"):
        DenseCRFd("pred", image_key="img")({"pred": pred})
    with pytest.raises(ValueError, match="theta_bilateral_mm"):
        DenseCRFd("pred", theta_bilateral_mm=0)
    with pytest.raises(ValueError, match="n_iter"):
        DenseCRFd("pred", n_iter=0)
    with pytest.raises(ValueError, match="spacing"):
        DenseCRFd("pred", spacing=(1.0, 1.0))


@pytest.mark.parametrize("use_crf, present", [(False, False), (True, True), ("false", False), ("true", True), ("False", False)])
def test_config_switch_drops_disabled_component(use_crf, present):
    """``_disabled_`` inside a Compose list drops the entry (not None), also for the strings the
    ``monai.bundle`` command line passes for ``--use_crf false``/``true``."""
    cfg = {
        "use_crf": use_crf,
        "post": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            copy.deepcopy(CRF_COMPONENT),
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        ]},
    }
    names = [type(t).__name__ for t in ConfigParser(cfg).get_parsed_content("post").transforms]
    assert names == (["Activationsd", "DenseCRFd", "AsDiscreted"] if present else ["Activationsd", "AsDiscreted"])


def test_bundle_configs_hold_this_crf_entry_before_invertd():
    inference = json.loads((REPO / "bundle" / "configs" / "inference.json").read_text())
    assert inference["crf"] == CRF_COMPONENT and inference["postprocessing"]["transforms"].index("@crf") < inference["postprocessing"]["transforms"].index("@invert")
    train = json.loads((REPO / "bundle" / "configs" / "train.json").read_text())
    transforms = json.loads((REPO / "bundle" / "configs" / "evaluate.json").read_text())["validate#postprocessing"]["transforms"]
    assert train["crf"] == CRF_COMPONENT and transforms.index("@crf") < transforms.index("@eval_invert")


def test_bundle_postprocessing_before_invertd(tmp_path):
    """The real inference.json chain with the CRF inserted after Activationsd: the CRF sees the
    prediction and the preprocessed image on one grid, and Invertd/SaveImaged still work."""
    data = tmp_path / "data"
    write_toy_dataset(data, "brats2021", n=1, shape=(24, 20, 16))
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    parser["dataset_dir"] = str(data)
    parser["output_dir"] = str(tmp_path / "out")
    parser["use_crf"] = True
    (tmp_path / "out").mkdir()
    item = parser.get_parsed_content("preprocessing")(parser.get_parsed_content("datalist")[0])
    image = item["image"]
    logits = torch.full((3,) + tuple(image.shape[1:]), -6.0)
    logits[:, 6:14, 5:12, 4:10] = 6.0  # a box tumour in all three regions
    logits[1, 2, 2, 2] = 3.0  # a lone WT voxel
    pred = MetaTensor(logits, meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations))
    post = parser.get_parsed_content("postprocessing")
    assert [type(t).__name__ for t in post.transforms][:3] == ["Activationsd", "DenseCRFd", "Invertd"]
    out = post({"image": image, "pred": pred})
    assert post.transforms[1].last_info["pred"]["voxels"] > 0
    assert out["pred"].shape[0] == 1 and out["pred"].dtype == torch.uint8
    assert (tmp_path / "out" / "BraTS2021_00000.nii.gz").is_file()
