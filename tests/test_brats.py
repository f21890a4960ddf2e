"""The BraTS data layer: layout detection, case listing, label conversions, folds, errors."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BRATS_AFFINE, PYTHON, REPO, case_id_for, run_env, toy_label, toy_modalities, write_toy_dataset
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, ConvertToMultiChannelBasedOnBratsClasses, EnsureChannelFirstd, Lambdad, LoadImaged, NormalizeIntensityd

from custom.data import CONVENTIONS, LAYOUTS, MODALITIES, BraTSDataError, detect_layout, list_cases
from custom.data.datalist import kfold_split, make_datalist, select_fold
from custom.transforms import (
    CheckedLoadImaged,
    LabelToRegions,
    LabelToRegionsd,
    RegionsToLabel,
    RegionsToLabeld,
    ZeroBackground,
    ZeroBackgroundd,
)

LAYOUT_NAME = {"brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd"}


def load_canonical(case) -> torch.Tensor:
    """Load a case's image the way the bundle does: stacked, channel-first, canonical order."""
    t = Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        Lambdad("image", lambda x: x[list(case.layout.channel_index)]),
    ])
    return t(case.to_dict())["image"]


def test_detects_layout_and_lists_cases_in_canonical_order(tmp_path, layout):
    ids = write_toy_dataset(tmp_path, layout, n=4, unlabelled=1)
    assert detect_layout(tmp_path).name == LAYOUT_NAME[layout]
    cases = list_cases(tmp_path)
    assert [c.case_id for c in cases] == sorted(ids)
    assert [c.label is None for c in cases] == [False, False, False, True]
    for case in cases:
        img = load_canonical(case)
        assert img.shape == (4, 12, 10, 8)
        # toy channel c holds values 100*(c+1)+noise, written in canonical order T1, T1ce, T2, FLAIR
        assert [int(img[c].min()) // 100 for c in range(4)] == [1, 2, 3, 4]
        if layout != "msd":
            names = [p.rsplit("/", 1)[1] for p in case.images]
            sep = "_" if layout == "brats2021" else "-"
            suffixes = ("t1", "t1ce", "t2", "flair") if layout == "brats2021" else ("t1n", "t1c", "t2w", "t2f")
            assert names == [f"{case.case_id}{sep}{s}.nii.gz" for s in suffixes]
    assert MODALITIES == ("t1", "t1ce", "t2", "flair")


def test_msd_channel_order_follows_dataset_json(tmp_path):
    write_toy_dataset(tmp_path, "msd", n=2)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert detect_layout(tmp_path).channel_index == (1, 2, 3, 0)
    meta["modality"] = {"0": "T1w", "1": "t1gd", "2": "T2w", "3": "FLAIR"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert detect_layout(tmp_path).channel_index == (0, 1, 2, 3)
    meta["modality"] = {"0": "T1w", "1": "t1gd", "2": "T2w", "3": "PD"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(BraTSDataError, match="flair"):
        detect_layout(tmp_path)


@pytest.mark.parametrize("name", ["brats2021", "brats2023", "msd"])
def test_label_region_conversion_both_ways(name):
    c = CONVENTIONS[name]
    lab = np.zeros((1, 4, 1, 1), np.uint8)
    lab[0, :, 0, 0] = [0, c.ncr, c.ed, c.et]
    regions = LabelToRegions(name)(torch.as_tensor(lab))
    # rows: background, NCR, ED, ET; columns TC, WT, ET
    expected = [[0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 1]]
    assert regions[:, :, 0, 0].T.tolist() == expected
    assert regions.dtype == torch.float32
    back = RegionsToLabel(name)(regions)
    assert back.dtype == torch.uint8 and torch.equal(back, torch.as_tensor(lab))
    # a bigger nested label round-trips, numpy in -> numpy out
    full = toy_label(layout={"brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd"}[name])[None]
    assert np.array_equal(RegionsToLabel(name)(LabelToRegions(name)(full)), full)


@pytest.mark.parametrize("et_label,name", [(4, "brats2021"), (3, "brats2023")])
def test_regions_agree_with_monai_brats_converter(et_label, name):
    lab = torch.as_tensor(toy_label(layout="brats2021" if et_label == 4 else "brats2023"))
    ours = LabelToRegions(name, dtype=torch.bool)(lab[None])
    monai = ConvertToMultiChannelBasedOnBratsClasses(et_label=et_label)(lab)
    assert torch.equal(ours, torch.as_tensor(monai))


def test_dictionary_transforms_and_bad_label_values(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=1)
    case = list_cases(tmp_path)[0]
    load = Compose([LoadImaged("label", image_only=True), EnsureChannelFirstd("label")])
    d = LabelToRegionsd("label", "brats2021")(load({"label": case.label}))
    assert d["label"].shape == (3, 12, 10, 8)
    assert RegionsToLabeld("label", "brats2021")(d)["label"].shape == (1, 12, 10, 8)
    # the same file read with the 2023 convention has a 4 that 2023 does not allow
    with pytest.raises(BraTSDataError, match=r"BraTS2021_00000_seg\.nii\.gz.*\[4\].*brats2023"):
        LabelToRegionsd("label", "brats2023")(load({"label": case.label}))
    with pytest.raises(ValueError, match="unknown label convention"):
        LabelToRegions("brats2019")
    with pytest.raises(ValueError, match=r"\(3, H, W, D\)"):
        RegionsToLabel("msd")(torch.zeros(2, 4, 4, 4))


def test_kfold_split_is_deterministic_balanced_and_order_free():
    ids = [f"BraTS2021_{i:05d}" for i in range(23)]
    folds = kfold_split(ids, 5, seed=3)
    assert folds == kfold_split(list(reversed(ids)), 5, seed=3)
    assert sorted(np.bincount(list(folds.values())).tolist()) == [4, 4, 5, 5, 5]
    assert folds != kfold_split(ids, 5, seed=4)
    with pytest.raises(ValueError):
        kfold_split(ids, 1)


def test_datalist_json_reads_with_monai_loader(tmp_path, layout):
    data = tmp_path / "data"
    write_toy_dataset(data, layout, n=6, unlabelled=2)
    out = tmp_path / "datalist.json"
    proc = subprocess.run([PYTHON, "-m", "custom.data.datalist", "--dataset_dir", str(data), "--out", str(out), "--folds", "2"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    train = load_decathlon_datalist(out, is_segmentation=True, data_list_key="training")
    test = load_decathlon_datalist(out, is_segmentation=False, data_list_key="testing")
    assert len(train) == 4 and len(test) == 2
    assert sorted(d["fold"] for d in train) == [0, 0, 1, 1]
    expected = make_datalist(data, n_folds=2)
    assert [d["case_id"] for d in train] == [d["case_id"] for d in expected["training"]]
    val = select_fold(expected, 1, validation=True)
    trn = select_fold(expected, 1, validation=False)
    assert {d["case_id"] for d in val}.isdisjoint(d["case_id"] for d in trn) and len(val) + len(trn) == 4
    with pytest.raises(ValueError, match="fold must be in 0..1"):
        select_fold(expected, 2, validation=True)


# ---- bad input: clear errors naming the case and the file -------------------------------------------------------

def first_case_dir(root, layout="brats2021"):
    return root / case_id_for(layout, 0)


def _drop(root, layout, case_index, modalities):
    """Delete the files of ``modalities`` (canonical names) of one toy case."""
    suffixes, sep = LAYOUTS[layout].suffixes, LAYOUTS[layout].separator
    cid = case_id_for(layout, case_index)
    for m in modalities:
        (root / cid / f"{cid}{sep}{suffixes[MODALITIES.index(m)]}.nii.gz").unlink()
    return cid


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_case_with_only_flair_and_t1ce_is_listed_and_loads_zero_filled(tmp_path, layout):
    """Issue #13: a case may lack sequences if it has FLAIR or T2; the loader zero-fills the others."""
    write_toy_dataset(tmp_path, layout, n=2)
    cid = _drop(tmp_path, layout, 0, ("t1", "t2"))
    case, full = list_cases(tmp_path, check="full")
    assert case.case_id == cid and case.sequences == ("t1ce", "flair") and not case.complete
    assert full.sequences == MODALITIES and full.complete
    suffixes, sep = LAYOUTS[layout].suffixes, LAYOUTS[layout].separator
    item = case.to_dict()
    assert item["sequences"] == ["t1ce", "flair"]
    assert [p.rsplit("/", 1)[1] for p in item["image"]] == [f"{cid}{sep}{suffixes[1]}.nii.gz", f"{cid}{sep}{suffixes[3]}.nii.gz"]
    assert case.display_image == item["image"][1]  # what an annotator sees: the FLAIR
    assert full.to_dict()["sequences"] == list(MODALITIES) and len(full.to_dict()["image"]) == 4
    assert make_datalist(tmp_path, n_folds=2)["training"][0]["sequences"] == ["t1ce", "flair"]
    # only T2 (no FLAIR) is enough too; layout detection works without the T1ce/FLAIR files
    _drop(tmp_path, layout, 1, ("t1", "t1ce", "flair"))
    assert detect_layout(tmp_path).name == LAYOUT_NAME[layout]
    assert list_cases(tmp_path)[1].sequences == ("t2",)

    out = CheckedLoadImaged(["image", "label"], image_only=True, ensure_channel_first=True, allow_missing_keys=True)(item)
    img = out["image"]
    assert img.shape == (4, *toy_label().shape)
    mods = toy_modalities(seed=0)
    np.testing.assert_array_equal(img[1].numpy(), mods[1])
    np.testing.assert_array_equal(img[3].numpy(), mods[3])
    assert not img[0].any() and not img[2].any()
    assert out["sequences"] == "t1ce,flair" and img.meta["sequences"] == "t1ce,flair"
    # a missing channel stays exactly 0 through the bundle's intensity normalisation
    norm = NormalizeIntensityd("image", nonzero=True, channel_wise=True)(out)["image"]
    assert not norm[0].any() and not norm[2].any() and abs(float(norm[3].mean())) < 1e-5


def test_case_without_flair_and_t2_is_refused_naming_what_it_has(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=2)
    _drop(tmp_path, "brats2021", 0, ("t2", "flair"))
    with pytest.raises(BraTSDataError, match=r"case BraTS2021_00000: has T1, T1ce; the model needs FLAIR or T2 \(missing modality t2, flair; expected "
                                             r"BraTS2021_00000_t2\.nii\.gz, BraTS2021_00000_flair\.nii\.gz"):
        list_cases(tmp_path)
    _drop(tmp_path, "brats2021", 0, ("t1", "t1ce"))  # a segmentation alone is no case either
    with pytest.raises(BraTSDataError, match=r"case BraTS2021_00000: has no image \(only a segmentation\); the model needs FLAIR or T2"):
        list_cases(tmp_path)
    # the loader refuses the same from a datalist entry
    case = {"case_id": "X", "image": [str(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz")], "sequences": ["t1"]}
    with pytest.raises(BraTSDataError, match=r"case X: has T1; the model needs FLAIR or T2"):
        CheckedLoadImaged("image", image_only=True, ensure_channel_first=True)(case)


def test_zero_background_on_a_z_scored_nifti(tmp_path):
    """Skull-stripped, z-scored MRI (BraTS 2015 / DeepMedic style) has a constant background at the
    image minimum: it becomes 0, the brain is untouched; int16 data with a 0 background is unchanged."""
    rng = np.random.default_rng(0)
    shape = (20, 18, 16)
    brain = np.zeros(shape, bool)
    brain[4:16, 3:15, 3:13] = True
    raw = rng.normal(500, 100, shape)
    z = np.full(shape, 0.0, np.float32)
    z[brain] = (raw[brain] - raw[brain].mean()) / raw[brain].std()
    background = -3.16
    assert z[brain].min() > background
    z[~brain] = background
    path = tmp_path / "case_subtrMeanDivStd.nii.gz"
    nib.save(nib.Nifti1Image(z, BRATS_AFFINE), path)
    loaded = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": [str(path), str(path)]})
    loaded["image"][1] = torch.where(loaded["image"][1] == background, torch.tensor(0.0), loaded["image"][1])  # channel 1: already 0
    before = loaded["image"].clone()
    out = ZeroBackgroundd("image")(loaded)["image"]
    assert out.shape == (2, *shape) and out.meta["filename_or_obj"] == before.meta["filename_or_obj"]
    np.testing.assert_array_equal(out[0].numpy(), np.where(brain, before[0].numpy(), 0))
    np.testing.assert_array_equal(out[1].numpy(), before[1].numpy())
    # standard BraTS int16 data (background 0) and an image whose corners are not all one value: unchanged
    int16 = np.where(brain, rng.integers(1, 3000, shape), 0).astype(np.int16)[None]
    assert ZeroBackground()(int16) is int16
    corner = z.copy()[None]
    corner[0, 0, 0, 0] = 5.0
    assert ZeroBackground()(corner) is corner
    # a constant that is not the minimum (a brain voxel below it) is left alone
    low = z.copy()[None]
    low[0, 8, 8, 8] = -4.0
    assert ZeroBackground()(low) is low


def test_duplicated_modality(tmp_path):
    write_toy_dataset(tmp_path, "brats2023", n=1)
    d = first_case_dir(tmp_path, "brats2023")
    shutil.copy(d / "BraTS-GLI-00000-000-t2w.nii.gz", d / "copy-of-t2w.nii.gz")
    with pytest.raises(BraTSDataError, match=r"case BraTS-GLI-00000-000: duplicated 't2w' files"):
        list_cases(tmp_path)


def test_shape_mismatch(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=1)
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 9), np.int16), BRATS_AFFINE), first_case_dir(tmp_path) / "BraTS2021_00000_flair.nii.gz")
    with pytest.raises(BraTSDataError, match=r"case BraTS2021_00000: .*_flair\.nii\.gz has shape \(12, 10, 9\)"):
        list_cases(tmp_path)


def test_affine_mismatch(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=1)
    shifted = BRATS_AFFINE.copy()
    shifted[2, 3] = 5.0
    nib.save(nib.Nifti1Image(toy_label(), shifted), first_case_dir(tmp_path) / "BraTS2021_00000_seg.nii.gz")
    with pytest.raises(BraTSDataError, match=r"case BraTS2021_00000: .*_seg\.nii\.gz and .*_t1\.nii\.gz have different affines"):
        list_cases(tmp_path)


def test_label_values_outside_convention(tmp_path):
    write_toy_dataset(tmp_path, "brats2023", n=1)
    lab = toy_label(layout="brats2023")
    lab[0, 0, 0] = 4  # a BraTS 2021 ET value in a 2023 dataset
    nib.save(nib.Nifti1Image(lab, BRATS_AFFINE), first_case_dir(tmp_path, "brats2023") / "BraTS-GLI-00000-000-seg.nii.gz")
    list_cases(tmp_path)  # header checks pass
    with pytest.raises(BraTSDataError, match=r"case BraTS-GLI-00000-000: .*-seg\.nii\.gz: label values \[4\] are not in the brats2023"):
        list_cases(tmp_path, check="full")


def test_msd_4d_image_with_wrong_channel_count(tmp_path):
    write_toy_dataset(tmp_path, "msd", n=2)
    vol = np.stack(toy_modalities()[:3], -1)
    nib.save(nib.Nifti1Image(vol, BRATS_AFFINE), tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    with pytest.raises(BraTSDataError, match=r"case BRATS_001: .*BRATS_001\.nii\.gz: a 4D image must have 4 channels .* got 3"):
        list_cases(tmp_path)


def test_3d_where_4d_expected(tmp_path):
    write_toy_dataset(tmp_path, "msd", n=1)
    nib.save(nib.Nifti1Image(toy_modalities()[0], BRATS_AFFINE), tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    with pytest.raises(BraTSDataError, match=r"expected a 4D image, got shape \(12, 10, 8\)"):
        list_cases(tmp_path)


def test_empty_and_unrecognised_folders(tmp_path):
    with pytest.raises(BraTSDataError, match="no BraTS dataset found.*holds: nothing"):
        detect_layout(tmp_path)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(BraTSDataError, match=r"no BraTS dataset found.*\['notes', 'scan\.nii\.gz'\]"):
        list_cases(tmp_path)
    with pytest.raises(BraTSDataError, match="does not exist"):
        list_cases(tmp_path / "nope")


def test_unreadable_and_truncated_files(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=2)
    t2 = first_case_dir(tmp_path) / "BraTS2021_00000_t2.nii.gz"
    good = t2.read_bytes()
    t2.write_bytes(b"this is not a NIfTI file at all")
    with pytest.raises(BraTSDataError, match=r"case BraTS2021_00000: .*_t2\.nii\.gz: not a readable NIfTI file"):
        list_cases(tmp_path)
    # truncated: a valid gzip stream cut short keeps a readable header but loses voxels
    raw = gzip.decompress(good)
    t2.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(BraTSDataError, match=r"case BraTS2021_00000: .*_t2\.nii\.gz: truncated or corrupt NIfTI data"):
        list_cases(tmp_path, check="full")


def test_check_cli_reports_layout_and_errors(tmp_path):
    write_toy_dataset(tmp_path, "brats2023", n=2, unlabelled=1)
    ok = subprocess.run([PYTHON, "-m", "custom.data", str(tmp_path)], cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert ok.returncode == 0 and "layout brats2023, 2 cases (1 labelled)" in ok.stdout
    bad = subprocess.run([PYTHON, "-m", "custom.data", str(tmp_path / "missing")], cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
