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
from scipy import ndimage as ndi

from conftest import PYTHON, REPO, run_env
from custom import render, synthetic as syn

SMALL = (96, 96, 62)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])
SEED = 7


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Small datasets in the three layouts: 2021 (3 cases, last unlabelled), 2023 (2), msd (3, last unlabelled)."""
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for layout, n, k in (("2021", 3, 1), ("2023", 2, 0), ("msd", 3, 1)):
        out[layout] = root / layout
        ids = syn.write_dataset(out[layout], n, SEED, layout, "small", unlabelled=k)
        assert ids == [syn.case_id(layout, i) for i in range(n)]
    return out


@pytest.fixture(scope="module")
def cases():
    """generate_case output (with tissue maps) for three small cases."""
    return [syn.generate_case(i, SEED, "small", return_maps=True) for i in range(3)]


def _check_header(img, shape, dtype, affine):
    assert img.shape == shape
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)


@pytest.mark.parametrize("layout", ["2021", "2023"])
def test_brats_layout_files_and_headers(datasets, layout):
    root = datasets[layout]
    n = 3 if layout == "2021" else 2
    names = {"2021": ["t1", "t1ce", "t2", "flair"], "2023": ["t1n", "t1c", "t2w", "t2f"]}[layout]
    sep = "_" if layout == "2021" else "-"
    ids = [f"BraTS2021_{i:05d}" if layout == "2021" else f"BraTS-GLI-{i:05d}-000" for i in range(n)]
    assert sorted(p.name for p in root.iterdir()) == ids
    for i, cid in enumerate(ids):
        labelled = not (layout == "2021" and i == n - 1)
        expected = {f"{cid}{sep}{m}.nii.gz" for m in names} | ({f"{cid}{sep}seg.nii.gz"} if labelled else set())
        assert {p.name for p in (root / cid).iterdir()} == expected
        for m in names:
            img = nib.load(root / cid / f"{cid}{sep}{m}.nii.gz")
            _check_header(img, SMALL, np.int16, syn.grid_affine("small"))
            data = np.asarray(img.dataobj)
            assert data.min() == 0 and 300 < np.percentile(data[data > 0], 50) < 3000
        if labelled:
            seg = nib.load(root / cid / f"{cid}{sep}seg.nii.gz")
            _check_header(seg, SMALL, np.uint8, syn.grid_affine("small"))
            values = set(np.unique(np.asarray(seg.dataobj)).tolist())
            allowed = {0, 1, 2, 4} if layout == "2021" else {0, 1, 2, 3}
            assert values <= allowed and {0, 2} <= values


def test_msd_layout_json_channels_and_labels(datasets):
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
    img = nib.load(root / "imagesTr" / "BRATS_001.nii.gz")
    _check_header(img, (*SMALL, 4), np.int16, syn.grid_affine("small"))
    lab = nib.load(root / "labelsTr" / "BRATS_001.nii.gz")
    _check_header(lab, SMALL, np.uint8, syn.grid_affine("small"))
    # channel order FLAIR, T1w, t1gd, T2w and MSD label values (1 ED, 2 NCR/NET, 3 ET)
    images, seg, _ = syn.generate_case(0, SEED, "small")
    vol = np.asarray(img.dataobj)
    for c, m in enumerate(("flair", "t1", "t1ce", "t2")):
        np.testing.assert_array_equal(vol[..., c], images[m])
    lab = np.asarray(lab.dataobj)
    for internal, value in ((syn.NCR, 2), (syn.ED, 1), (syn.ET, 3), (0, 0)):
        np.testing.assert_array_equal(lab == value, seg == internal)


def test_full_geometry_and_centred_brain():
    images, seg, affine = syn.generate_case(0, SEED, "full")
    np.testing.assert_array_equal(affine, BRATS_AFFINE)
    assert syn.grid_shape("full") == (240, 240, 155) and seg.shape == (240, 240, 155) and seg.dtype == np.uint8
    for m in syn.MODALITIES:
        assert images[m].shape == (240, 240, 155) and images[m].dtype == np.int16
    # the brain sits in the middle of the field of view (x, y), below its top (z)
    brain = np.argwhere(images["t1"] > 0)
    centre_world = affine[:3, :3] @ brain.mean(0) + affine[:3, 3]
    fov_centre = affine[:3, :3] @ (np.array([239, 239, 154]) / 2) + affine[:3, 3]
    assert np.all(np.abs(centre_world[:2] - fov_centre[:2]) < 12)
    assert brain[:, 2].max() < 154 and 40 < brain[:, 2].mean() < 115
    # same field of view at both sizes: the voxel-edge corners coincide
    for size in ("full", "small"):
        a, n = syn.grid_affine(size), np.array(syn.grid_shape(size))
        lo = a[:3, :3] @ np.full(3, -0.5) + a[:3, 3]
        hi = a[:3, :3] @ (n - 0.5) + a[:3, 3]
        np.testing.assert_allclose(lo, [0.5, 239.5, -0.5])
        np.testing.assert_allclose(hi, [-239.5, -0.5, 154.5])


def test_labels_nesting_volumes_and_brain(cases):
    for images, seg, affine, maps in cases:
        brain = maps["brain"]
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        assert not seg[~brain].any(), "labelled voxels outside the brain"
        for m in syn.MODALITIES:
            assert images[m].dtype == np.int16 and images[m].min() >= 0
            assert not images[m][~brain].any(), f"{m} non-zero outside the brain"
            assert (images[m][brain] > 0).mean() > 0.99
        vox_ml = 2.5 ** 3 / 1000
        wt, tc = seg > 0, (seg == syn.NCR) | (seg == syn.ET)
        assert 15 < wt.sum() * vox_ml < 200
        assert 0 < tc.sum() < wt.sum()
        # the core is surrounded by oedema / tumour: few core voxels touch background
        touching = tc & ndi.binary_dilation(seg == 0)
        assert touching.sum() <= 0.2 * tc.sum()
        assert (seg == syn.ED).sum() > 0
        # one lesion: a single connected whole tumour
        assert ndi.label(wt)[1] == 1
        assert maps["info"]["wt_ml"] == pytest.approx(wt.sum() * vox_ml)


def test_contrasts(cases):
    for images, seg, _, maps in cases:
        wm = (maps["wm"] > 0.9) & (seg == 0)
        gm = (maps["gm"] > 0.7) & (seg == 0)
        csf = (maps["csf"] > 0.9) & (seg == 0)
        mean = {m: {k: float(images[m][r].mean()) for k, r in (("wm", wm), ("gm", gm), ("csf", csf))}
                for m in syn.MODALITIES}
        assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
        assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"]
        assert mean["flair"]["gm"] > mean["flair"]["wm"] > mean["flair"]["csf"]
        ed, ncr, et = seg == syn.ED, seg == syn.NCR, seg == syn.ET
        flair, t1ce, t2, t1 = (images[m].astype(float) for m in ("flair", "t1ce", "t2", "t1"))
        assert flair[ed].mean() > 1.3 * flair[wm].mean()
        assert t2[ed].mean() > 1.3 * t2[wm].mean()
        assert t1[ed].mean() < t1[wm].mean()
        if et.sum() >= 5:
            assert t1ce[et].mean() > 1.15 * t1ce[wm].mean()
            if ncr.sum() >= 5:
                assert t1ce[et].mean() > 1.5 * t1ce[ncr].mean()
        if ncr.sum() >= 5:
            assert t2[ncr].mean() > t2[wm].mean()


def test_enhancing_and_non_enhancing_types_occur():
    kinds = {syn.generate_case(i, 0, "small", return_maps=True)[3]["info"]["type"] for i in range(12)}
    assert kinds == {"enhancing", "non-enhancing"}


def test_reproducible_bytes_and_independent_of_case_count(datasets, tmp_path):
    ref = _digest(datasets["2021"])
    syn.write_dataset(tmp_path / "again", 1, SEED, "2021", "small")
    again = _digest(tmp_path / "again")
    assert again and all(ref[k] == v for k, v in again.items())  # case 0 is the same when writing 1 or 3 cases
    raw = (tmp_path / "again" / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08  # mtime 0, no file name
    assert len(gzip.decompress(raw)) > 352
    syn.write_dataset(tmp_path / "other", 1, SEED + 1, "2021", "small")
    other = _digest(tmp_path / "other")
    assert all(ref[k] != v for k, v in other.items())
    # different case indices differ
    a, b = ref["BraTS2021_00000/BraTS2021_00000_t1.nii.gz"], ref["BraTS2021_00001/BraTS2021_00001_t1.nii.gz"]
    assert a != b


def test_refuses_a_different_dataset_and_overwrites_own(tmp_path):
    out = tmp_path / "ds"
    (out / "BraTS2021_00007").mkdir(parents=True)
    foreign = out / "BraTS2021_00007" / "BraTS2021_00007_t1.nii.gz"
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="BraTS2021_00007_t1.nii.gz"):
        syn.write_dataset(out, 1, 0, "2021", "small")
    assert foreign.read_bytes() == b"not ours" and not (out / "BraTS2021_00000").exists()
    foreign.unlink()
    (out / "notes.txt").write_text("keep me")  # unrelated files are fine and left alone
    syn.write_dataset(out, 2, 0, "2023", "small")
    syn.write_dataset(out, 2, 1, "2023", "small")  # same files: overwriting is fine
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):  # a different layout is a different dataset
        syn.write_dataset(out, 1, 0, "2021", "small")
    with pytest.raises(FileExistsError):  # fewer cases would leave stale ones behind
        syn.write_dataset(out, 1, 0, "2023", "small")
    with pytest.raises(ValueError):
        syn.write_dataset(tmp_path / "x", 2, 0, "2021", "small", unlabelled=3)
    with pytest.raises(ValueError):
        syn.generate_case(0, 0, "medium")


def test_cli_subprocess(tmp_path):
    out = tmp_path / "cli"
    cmd = [PYTHON, "-m", "custom.synthetic", "--out", str(out), "--cases", "2", "--seed", "3",
           "--layout", "2023", "--size", "small", "--unlabelled", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz").is_file()
    assert sorted(p.name for p in (out / "BraTS-GLI-00001-000").iterdir()) == [
        f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1c", "t1n", "t2f", "t2w")]
    for bad, msg in ((["--cases", "0"], "--cases"), (["--cases", "2", "--unlabelled", "3"], "--unlabelled"),
                     (["--layout", "2020"], "--layout"), (["--size", "tiny"], "--size")):
        r = subprocess.run([PYTHON, "-m", "custom.synthetic", "--out", str(tmp_path / "bad"), *bad], cwd=REPO,
                           env=run_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)
    assert not (tmp_path / "bad").exists()


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_2021_folder_msd_file_and_unlabelled(datasets, tmp_path):
    assert render.main([str(datasets["2021"] / "BraTS2021_00000"), "--out", str(tmp_path / "a.png")]) == 0
    assert _is_png(tmp_path / "a.png")
    assert render.main([str(datasets["msd"] / "imagesTr" / "BRATS_001.nii.gz"), "--out", str(tmp_path / "b.png")]) == 0
    assert _is_png(tmp_path / "b.png")
    images, label, _, conv = render.load_case(datasets["msd"] / "imagesTr" / "BRATS_001.nii.gz")
    assert conv == "msd" and label is not None and set(images) == {"t1", "t1ce", "t2", "flair"}
    images, label, _, conv = render.load_case(datasets["2023"] / "BraTS-GLI-00001-000")
    assert conv == "2023" and label is not None
    images, label, _, _ = render.load_case(datasets["2021"] / "BraTS2021_00002")  # unlabelled
    assert label is None
    render.render_case(images, None, tmp_path / "c.png")
    assert _is_png(tmp_path / "c.png")
    with pytest.raises(SystemExit):
        render.main([str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")])
