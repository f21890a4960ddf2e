"""Synthetic BraTS-like dataset (custom.synthetic) and case rendering (custom.render)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PYTHON, REPO, run_env
from scipy import ndimage as ndi

from custom import render
from custom import synthetic as syn
from custom.data import MODALITIES, load_case
from tools.render_case import main as render_cli

SMALL, MEDIUM, FULL = (96, 96, 62), (120, 120, 78), (240, 240, 155)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])
SEED = 7
# Small cases of SEED generated once: 0-2 are the datasets' files; 0-3, 7, 10 and 11 hold all four intensity
# styles, the four tumour types, random and drawn contrasts; 17 is a multifocal (two foci) nodular lesion.
CACHED = (0, 1, 2, 3, 7, 10, 11, 17)
STYLE_DTYPES = {"int16": np.int16, "uint16": np.uint16, "float": np.float32, "zscore": np.float32}
ARTEFACTS = {"thick-slices", "ringing", "ghosts"}


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cases() -> dict:
    """generate_case output (with maps) for the small cases ``CACHED`` of ``SEED``, by index."""
    return {i: syn.generate_case(i, SEED, "small", return_maps=True) for i in CACHED}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Small datasets of SEED in the three layouts: 2021 (3 cases, last unlabelled), 2023 (2), msd (3, last unlabelled)."""
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for layout, n, k in (("brats2021", 3, 1), ("brats2023", 2, 0), ("msd", 3, 1)):
        out[layout] = root / layout
        ids = syn.write_dataset(out[layout], n, SEED, layout, "small", unlabelled=k)
        assert ids == [syn.case_id(layout, i) for i in range(n)]
    return out


def _check_header(img, shape, dtype, affine):
    assert img.shape == shape
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_brats_layout_files_and_headers(datasets, cases, layout):
    root = datasets[layout]
    n = 3 if layout == "brats2021" else 2
    names = {"brats2021": ["t1", "t1ce", "t2", "flair"], "brats2023": ["t1n", "t1c", "t2w", "t2f"]}[layout]
    sep = "_" if layout == "brats2021" else "-"
    ids = [f"BraTS2021_{i:05d}" if layout == "brats2021" else f"BraTS-GLI-{i:05d}-000" for i in range(n)]
    assert sorted(p.name for p in root.iterdir()) == ids
    for i, cid in enumerate(ids):
        images, seg, _, maps = cases[i]
        dtype = STYLE_DTYPES[maps["info"]["style"]]
        labelled = not (layout == "brats2021" and i == n - 1)
        expected = {f"{cid}{sep}{m}.nii.gz" for m in names} | ({f"{cid}{sep}seg.nii.gz"} if labelled else set())
        assert {p.name for p in (root / cid).iterdir()} == expected
        for m, name in zip(MODALITIES, names):
            img = nib.load(root / cid / f"{cid}{sep}{name}.nii.gz")
            _check_header(img, SMALL, dtype, syn.grid_affine("small"))
            np.testing.assert_array_equal(np.asarray(img.dataobj), images[m])  # the files hold generate_case's arrays
        if labelled:
            lab = nib.load(root / cid / f"{cid}{sep}seg.nii.gz")
            _check_header(lab, SMALL, np.uint8, syn.grid_affine("small"))
            lab = np.asarray(lab.dataobj)
            allowed = {0, 1, 2, 4} if layout == "brats2021" else {0, 1, 2, 3}
            assert set(np.unique(lab).tolist()) <= allowed and {0, 2} <= set(np.unique(lab).tolist())
            np.testing.assert_array_equal(lab, syn.encode_labels(seg, layout))


def test_msd_layout_json_channels_and_labels(datasets, cases):
    root = datasets["msd"]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "dataset.json", "imagesTr/BRATS_001.nii.gz", "imagesTr/BRATS_002.nii.gz", "imagesTs/BRATS_003.nii.gz",
        "labelsTr/BRATS_001.nii.gz", "labelsTr/BRATS_002.nii.gz"]
    meta = json.loads((root / "dataset.json").read_text())
    for key in ("name", "description", "reference", "licence", "release", "tensorImageSize", "modality",
                "labels", "numTraining", "numTest", "training", "test"):
        assert key in meta
    assert meta["name"] == "BRATS" and meta["tensorImageSize"] == "4D"
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert meta["training"] == [{"image": f"./imagesTr/BRATS_00{i}.nii.gz", "label": f"./labelsTr/BRATS_00{i}.nii.gz"}
                                for i in (1, 2)]
    assert meta["test"] == ["./imagesTs/BRATS_003.nii.gz"]
    for i, sub in ((0, "imagesTr"), (2, "imagesTs")):
        images, seg, _, maps = cases[i]
        img = nib.load(root / sub / f"BRATS_00{i + 1}.nii.gz")
        _check_header(img, (*SMALL, 4), STYLE_DTYPES[maps["info"]["style"]], syn.grid_affine("small"))
        vol = np.asarray(img.dataobj)
        for c, m in enumerate(("flair", "t1", "t1ce", "t2")):  # channel order FLAIR, T1w, t1gd, T2w
            np.testing.assert_array_equal(vol[..., c], images[m])
    lab = nib.load(root / "labelsTr" / "BRATS_001.nii.gz")
    _check_header(lab, SMALL, np.uint8, syn.grid_affine("small"))
    lab, seg = np.asarray(lab.dataobj), cases[0][1]
    for internal, value in ((syn.NCR, 2), (syn.ED, 1), (syn.ET, 3), (0, 0)):  # MSD values: 1 ED, 2 NCR/NET, 3 ET
        np.testing.assert_array_equal(lab == value, seg == internal)


def test_grids_share_the_brats_field_of_view():
    assert syn.SIZES == ("full", "medium", "small")
    assert [syn.grid_shape(s) for s in syn.SIZES] == [FULL, MEDIUM, SMALL]
    assert [syn.grid_spacing(s) for s in syn.SIZES] == [1.0, 2.0, 2.5]
    np.testing.assert_array_equal(syn.grid_affine("full"), BRATS_AFFINE)
    for size in syn.SIZES:  # the voxel-edge corners coincide with the 1 mm grid's (medium: 0.5 mm more at the top)
        a, n = syn.grid_affine(size), np.array(syn.grid_shape(size))
        np.testing.assert_allclose(np.diag(a)[:3], [-syn.grid_spacing(size), -syn.grid_spacing(size), syn.grid_spacing(size)])
        lo = a[:3, :3] @ np.full(3, -0.5) + a[:3, 3]
        hi = a[:3, :3] @ (n - 0.5) + a[:3, 3]
        np.testing.assert_allclose(lo, [0.5, 239.5, -0.5])
        np.testing.assert_allclose(hi, [-239.5, -0.5, 155.5 if size == "medium" else 154.5])
    for bad in ("tiny", "MEDIUM"):
        with pytest.raises(ValueError, match="size"):
            syn.grid_shape(bad)
        with pytest.raises(ValueError, match="size"):
            syn.generate_case(0, 0, bad)


def test_full_size_case_centred_and_same_tumour_as_small(cases):
    images, seg, affine, maps = syn.generate_case(0, SEED, "full", return_maps=True)
    info, small = maps["info"], cases[0][3]["info"]
    np.testing.assert_array_equal(affine, BRATS_AFFINE)
    assert seg.shape == FULL and seg.dtype == np.uint8
    for m in MODALITIES:
        assert images[m].shape == FULL and images[m].dtype == STYLE_DTYPES[info["style"]]
    for k in ("wm", "gm", "csf"):
        assert maps[k].shape == FULL and maps[k].dtype == np.float32
    assert maps["brain"].dtype == bool and maps["kept"].dtype == bool
    assert not seg[~(maps["kept"] & maps["brain"])].any()
    # the brain sits in the middle of the field of view (x, y), below its top (z)
    brain = np.argwhere(maps["brain"])
    centre_world = affine[:3, :3] @ brain.mean(0) + affine[:3, 3]
    fov_centre = affine[:3, :3] @ (np.array([239, 239, 154]) / 2) + affine[:3, 3]
    assert np.all(np.abs(centre_world[:2] - fov_centre[:2]) < 12)
    assert brain[:, 2].max() < 154 and 40 < brain[:, 2].mean() < 115
    # the tumour is planned before anything that depends on the grid: same type, foci and about the same volume
    assert (info["type"], info["foci"]) == (small["type"], small["foci"])
    assert 0.75 < info["wt_ml"] / small["wt_ml"] < 1.33
    assert info["wt_ml"] == pytest.approx((seg > 0).sum() / 1000.0)


def test_images_labels_masks_and_styles(cases):
    vox_ml = 2.5 ** 3 / 1000
    remnant = cut = 0
    for i, (images, seg, affine, maps) in cases.items():
        info, kept, brain = maps["info"], maps["kept"], maps["brain"]
        np.testing.assert_array_equal(affine, syn.grid_affine("small"))
        assert seg.shape == SMALL and seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        assert kept.dtype == bool and brain.dtype == bool and kept.any()
        assert not seg[~kept].any() and not seg[~brain].any(), f"case {i}: labels outside the skull-strip mask / brain"
        remnant += int((kept & ~brain).sum())  # non-brain tissue left on by the skull stripping
        cut += int((brain & ~kept).sum())  # cortex cut away by it
        style = info["style"]
        for m in MODALITIES:
            img = images[m]
            assert img.shape == SMALL and img.dtype == STYLE_DTYPES[style], (i, m)
            assert np.all(np.isfinite(img))
            if style == "zscore":  # z-scored inside the mask; background = the image minimum, a constant
                low = img.min()
                assert low < 0 and np.all(img[~kept] == low), (i, m)
                assert len({img[0, 0, 0], img[-1, -1, -1], img[0, -1, 0], img[-1, 0, -1]}) == 1
                z = img[kept].astype(np.float64)
                assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 1e-3, (i, m)
            else:  # zero background, positive inside the mask
                assert not img[~kept].any(), (i, m)
                assert img.min() == 0 and (img[kept] > 0).mean() > 0.99, (i, m)
        # volumes in info agree with the label map; nested regions: ED around a core of NCR (+ ET)
        wt, tc, et = seg > 0, np.isin(seg, (syn.NCR, syn.ET)), seg == syn.ET
        assert info["wt_ml"] == pytest.approx(wt.sum() * vox_ml)
        assert info["tc_ml"] == pytest.approx(tc.sum() * vox_ml) and info["et_ml"] == pytest.approx(et.sum() * vox_ml)
        assert 0.5 < info["wt_ml"] < 300
        assert 0 < tc.sum() < wt.sum() and (seg == syn.ED).any()
        touching = tc & ndi.binary_dilation(seg == 0)  # few core voxels touch background
        assert touching.sum() <= 0.25 * tc.sum(), i
        assert set(info["artefacts"]) == set(MODALITIES)
        assert all(set(a) <= ARTEFACTS for a in info["artefacts"].values())
    assert remnant > 0 and cut > 0


def test_types_styles_foci_and_artefacts_vary(cases):
    infos = {i: c[3]["info"] for i, c in cases.items()}
    types = {info["type"] for info in infos.values()}
    assert types <= set(syn.TYPES) and len(types) >= 3 and "non-enhancing" in types
    assert {info["style"] for info in infos.values()} == set(STYLE_DTYPES)
    assert {info["random_contrast"] for info in infos.values()} == {True, False}
    assert any(any(a) for info in infos.values() for a in info["artefacts"].values())
    for i, (_, seg, _, maps) in cases.items():
        kind, foci = maps["info"]["type"], maps["info"]["foci"]
        if kind == "non-enhancing":  # no enhancing tumour at all
            assert not (seg == syn.ET).any() and maps["info"]["et_ml"] == 0 and (seg == syn.NCR).any()
        elif kind in ("necrotic", "nodular"):
            assert (seg == syn.ET).any() and (seg == syn.NCR).any(), (i, kind)
        n_components = ndi.label(seg > 0)[1]
        if foci == 1:
            assert n_components == 1, i
    multifocal = [i for i, info in infos.items() if info["foci"] > 1]
    assert multifocal and any(ndi.label(cases[i][1] > 0)[1] > 1 for i in multifocal)


def test_contrasts_of_cases_with_drawn_contrasts(cases):
    checked = 0
    for i, (images, seg, _, maps) in cases.items():
        if maps["info"]["random_contrast"]:  # SynthSeg-style random contrasts promise nothing
            continue
        checked += 1
        wm = (maps["wm"] > 0.9) & (seg == 0)
        gm = (maps["gm"] > 0.7) & (seg == 0)
        csf = (maps["csf"] > 0.9) & (seg == 0)
        ed, ncr, et = seg == syn.ED, seg == syn.NCR, seg == syn.ET
        # differences of means: holds for every intensity style (z-scoring keeps the order)
        mean = {m: {k: float(images[m][r].mean()) for k, r in (("wm", wm), ("gm", gm), ("csf", csf), ("ed", ed),
                                                                ("ncr", ncr), ("et", et)) if r.any()}
                for m in MODALITIES}
        t1, t2, flair, t1ce = mean["t1"], mean["t2"], mean["flair"], mean["t1ce"]
        assert t1["wm"] > t1["gm"] > t1["csf"], i
        assert t2["csf"] > t2["gm"] > t2["wm"], i
        assert flair["wm"] > flair["csf"], i  # fluid suppressed
        assert flair["ed"] > flair["wm"] and t2["ed"] > t2["wm"], i  # oedema bright on FLAIR and T2
        assert t2["ncr"] > t2["wm"], i
        if et.sum() >= 20:
            assert t1ce["et"] > t1ce["wm"] and t1ce["et"] > t1ce["ncr"], i
    assert checked >= 4


def test_reproducible_bytes_and_independent_of_case_count(datasets, cases, tmp_path):
    ref = _digest(datasets["brats2021"])
    syn.write_dataset(tmp_path / "again", 1, SEED, "brats2021", "small")
    again = _digest(tmp_path / "again")
    assert again and all(ref[k] == v for k, v in again.items())  # case 0 is the same when writing 1 or 3 cases
    raw = (tmp_path / "again" / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08  # mtime 0, no file name
    assert len(gzip.decompress(raw)) > 352
    syn.write_dataset(tmp_path / "other", 1, SEED + 1, "brats2021", "small")
    other = _digest(tmp_path / "other")
    assert all(ref[k] != v for k, v in other.items())
    # different case indices differ
    a, b = ref["BraTS2021_00000/BraTS2021_00000_t1.nii.gz"], ref["BraTS2021_00001/BraTS2021_00001_t1.nii.gz"]
    assert a != b
    # generate_case itself: same (seed, index), same arrays and info
    images, seg, _, maps = syn.generate_case(1, SEED, "small", return_maps=True)
    images0, seg0, _, maps0 = cases[1]
    np.testing.assert_array_equal(seg, seg0)
    for m in MODALITIES:
        assert images[m].tobytes() == images0[m].tobytes()
    assert maps["info"] == maps0["info"]


def test_workers_write_the_same_bytes(datasets, tmp_path):
    ids = syn.write_dataset(tmp_path / "w2", 3, SEED, "brats2021", "small", unlabelled=1, workers=2)
    assert ids == [syn.case_id("brats2021", i) for i in range(3)]
    assert _digest(tmp_path / "w2") == _digest(datasets["brats2021"])  # written with workers=1


def test_refuses_a_different_dataset_and_overwrites_own(tmp_path):
    out = tmp_path / "ds"
    (out / "BraTS2021_00007").mkdir(parents=True)
    foreign = out / "BraTS2021_00007" / "BraTS2021_00007_t1.nii.gz"
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="BraTS2021_00007_t1.nii.gz"):
        syn.write_dataset(out, 1, 0, "brats2021", "small")
    assert foreign.read_bytes() == b"not ours" and not (out / "BraTS2021_00000").exists()
    foreign.unlink()
    (out / "notes.txt").write_text("keep me")  # unrelated files are fine and left alone
    syn.write_dataset(out, 2, 0, "brats2023", "small")
    syn.write_dataset(out, 2, 1, "brats2023", "small")  # same files: overwriting is fine
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):  # a different layout is a different dataset
        syn.write_dataset(out, 1, 0, "brats2021", "small")
    with pytest.raises(FileExistsError):  # fewer cases would leave stale ones behind
        syn.write_dataset(out, 1, 0, "brats2023", "small")
    with pytest.raises(ValueError):
        syn.write_dataset(tmp_path / "x", 2, 0, "brats2021", "small", unlabelled=3)
    with pytest.raises(ValueError):
        syn.write_dataset(tmp_path / "x", 1, 0, "brats2021", "tiny")
    with pytest.raises(ValueError):
        syn.generate_case(-1, 0, "small")
    assert not (tmp_path / "x").exists()


def test_cli_medium_with_workers(tmp_path):
    out = tmp_path / "cli"
    cmd = [PYTHON, "-m", "custom.synthetic", "--out", str(out), "--cases", "2", "--seed", "3",
           "--layout", "brats2023", "--size", "medium", "--workers", "2", "--unlabelled", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 2 brats2023 cases (medium)" in r.stdout
    assert sorted(p.name for p in (out / "BraTS-GLI-00000-000").iterdir()) == [
        f"BraTS-GLI-00000-000-{m}.nii.gz" for m in ("seg", "t1c", "t1n", "t2f", "t2w")]
    assert sorted(p.name for p in (out / "BraTS-GLI-00001-000").iterdir()) == [
        f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1c", "t1n", "t2f", "t2w")]
    # a worker process writes what generate_case returns in this one
    images, seg, affine = syn.generate_case(0, 3, "medium")
    assert affine.tolist() == syn.grid_affine("medium").tolist()
    for m, name in (("flair", "t2f"), ("seg", "seg")):
        img = nib.load(out / "BraTS-GLI-00000-000" / f"BraTS-GLI-00000-000-{name}.nii.gz")
        want = seg if m == "seg" else images[m]
        _check_header(img, MEDIUM, want.dtype, syn.grid_affine("medium"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), want)
    for bad, msg in ((["--cases", "0"], "--cases"), (["--cases", "2", "--unlabelled", "3"], "--unlabelled"),
                     (["--layout", "2020"], "--layout"), (["--size", "tiny"], "--size"), (["--workers", "0"], "--workers")):
        r = subprocess.run([PYTHON, "-m", "custom.synthetic", "--out", str(tmp_path / "bad"), *bad], cwd=REPO,
                           env=run_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)
    assert not (tmp_path / "bad").exists()


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_2021_folder_msd_file_and_unlabelled(datasets, tmp_path):
    assert render_cli([str(datasets["brats2021"] / "BraTS2021_00000"), "--out", str(tmp_path / "a.png")]) == 0
    assert _is_png(tmp_path / "a.png")
    assert render_cli([str(datasets["msd"] / "imagesTr" / "BRATS_001.nii.gz"), "--out", str(tmp_path / "b.png")]) == 0
    assert _is_png(tmp_path / "b.png")
    case, volumes = load_case(datasets["msd"] / "imagesTr" / "BRATS_001.nii.gz")  # the data layer finds the MSD label
    assert case.layout.name == "msd" and case.label is not None and set(volumes) == set(MODALITIES)
    case, _ = load_case(datasets["brats2023"] / "BraTS-GLI-00001-000")
    assert case.layout.name == "brats2023" and case.label is not None
    case, volumes = load_case(datasets["brats2021"] / "BraTS2021_00002")  # unlabelled (z-scored)
    assert case.label is None
    render.render_case({m: v for m, (v, _) in volumes.items()}, None, tmp_path / "c.png")
    assert _is_png(tmp_path / "c.png")
    with pytest.raises(SystemExit):
        render_cli([str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")])
