"""BraTS studies as DICOM in a real PACS (Orthanc), the app's DICOMweb datastore, DICOM SEG results, OHIF.

- converter (tools/nifti_to_dicom.py): a BraTS case -> a four-series MR study; read back with SimpleITK (GDCM)
  and MONAI ``LoadImage`` (ITK) on the series folder: same voxels at the same world positions,
  also for oblique, left-handed and float volumes; series-description rules;
- Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, installed when missing, started on a free
  loopback port with the project's config): STOW-RS upload, QIDO-RS listing;
- the datastore in-process: studies -> images (FLAIR series uid), aliases, HTTP 422 listing the
  series of a study missing a modality, model input in the original geometry, label -> DICOM SEG ->
  label round trip;
- a real ``monailabel start_server --studies http://127.0.0.1:PORT/dicom-web`` serving the shipped
  model (``bundle/models/model.pt``): inference on the study with ``save_label``, the DICOM SEG read back from Orthanc and
  decoded into the image grid equals the NIfTI inference of the same case (uploaded as a 4D file to
  the same server, crf off);
- OHIF (``/ohif/`` of that server) in headless Chromium (Debian's ``chromium``, installed when
  missing): the study list shows the study from Orthanc; screenshot in tests/artifacts/.

Tests needing Orthanc or Chromium are skipped, with the reason, only when the packages are missing
and cannot be installed (no apt-get, not root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from scipy import ndimage as ndi

from custom.data import LAYOUTS, MODALITIES, SEQUENCE_NAMES, BraTSCase, load_case
from custom.data.dicom_series import SeriesMatchError, classify, match_series, parse_rules
from custom.synthetic import write_dataset
from custom.synthetic.fields import rotation
from custom.synthetic.raw_study import generate_raw_study
from devtools import REPO
from devtools.debian import AptUnavailable, apt_install
from devtools.orthanc import Orthanc
from tools.nifti_to_dicom import (
    DicomConversionError,
    convert_case,
    convert_study_folder,
    plane_geometry,
    stow,
    write_study,
)
from tools.nifti_to_dicom import (
    main as dicom_main,
)

APP = REPO / "monailabel_app"
VENV_BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "tests" / "artifacts"
CONFIGS = "inference.json"  # the shipped model: what OHIF's screenshots show is a real segmentation
OVERRIDES = {"use_crf": False, "num_samples": 1, "warmup_epochs": 1}
MODEL = "brats"
STARTUP_TIMEOUT = 180
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])



# ------------------------------------------------------------------------------------------ helpers


def read_series(folder) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series folder read with SimpleITK/GDCM -> (array in ITK index order x, y, z; RAS affine)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), itk_affine(img)


def itk_affine(img: sitk.Image) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return RAS_TO_LPS @ a


def assert_same_world(arr_a, aff_a, arr_b, aff_b, atol_mm=1e-3, values_atol=0.0):
    """Volumes ``a`` and ``b`` hold the same values at the same world positions (their grids may
    differ by axis flips / permutations)."""
    m = np.linalg.inv(aff_b) @ aff_a  # voxel of a -> voxel of b
    perm = np.round(m[:3, :3])
    assert np.allclose(m[:3, :3], perm, atol=1e-4), f"grids are not the same up to flips:\n{aff_a}\n{aff_b}"
    assert np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=atol_mm), f"grids are shifted by a fraction of a voxel: {m[:3, 3]}"
    assert np.allclose(aff_b @ m, aff_a, atol=atol_mm)
    idx = np.indices(arr_a.shape).reshape(3, -1)
    mapped = (perm @ idx + np.round(m[:3, 3])[:, None]).astype(int)
    assert all(0 <= mapped[d].min() and mapped[d].max() < arr_b.shape[d] for d in range(3)), "grids do not cover the same voxels"
    np.testing.assert_allclose(np.asarray(arr_a, np.float64).reshape(-1), np.asarray(arr_b, np.float64)[tuple(mapped)], atol=values_atol)
    assert arr_a.size == arr_b.size


def _case(tmp: Path, name: str, volumes: dict) -> BraTSCase:
    """A 2023-layout case folder holding ``volumes`` {modality: (array, affine)}."""
    d = tmp / name
    d.mkdir(parents=True)
    paths = []
    for m, suffix in zip(MODALITIES, LAYOUTS["brats2023"].suffixes):
        arr, aff = volumes[m]
        p = d / f"{name}-{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), p)
        paths.append(str(p))
    return BraTSCase(name, tuple(paths), None, LAYOUTS["brats2023"])


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Two synthetic BraTS 2021 cases (small grid, int16, every label: seed 7; float styles reach DICOM through a
    rescale slope, not bit-exact) and an MSD copy of case 0."""
    root = tmp_path_factory.mktemp("dicom_synth")
    write_dataset(root / "brats2021", 2, seed=7, layout="brats2021", size="small")
    write_dataset(root / "msd", 1, seed=7, layout="msd", size="small")
    return root


# --------------------------------------------------------------------------------------- converter


def test_case_to_study_four_series_geometry_and_voxels(synth, tmp_path):
    case_dir = synth / "brats2021" / "BraTS2021_00000"
    info = convert_case(case_dir, tmp_path)
    assert [s.description for s in info.series.values()] == ["T1", "T1ce", "T2", "FLAIR"]
    assert [s.number for s in info.series.values()] == [1, 2, 3, 4]
    uids = {s.series_uid for s in info.series.values()}
    assert len(uids) == 4
    from monai.transforms import LoadImage

    for m, s in info.series.items():
        original = nib.load(case_dir / f"BraTS2021_00000_{m}.nii.gz")
        orig = np.asanyarray(original.dataobj)
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in s.files]
        assert len(headers) == orig.shape[2]
        assert {h.StudyInstanceUID for h in headers} == {info.study_uid}
        assert {h.FrameOfReferenceUID for h in headers} == {info.frame_of_reference_uid}
        assert {h.SeriesInstanceUID for h in headers} == {s.series_uid}
        assert {h.SeriesDescription for h in headers} == {SEQUENCE_NAMES[m]} and {h.Modality for h in headers} == {"MR"}
        h = headers[0]
        assert [float(x) for x in h.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # BraTS voxel axes point to L, P (LPS +x, +y)
        assert [float(x) for x in h.PixelSpacing] == [2.5, 2.5] and float(h.SliceThickness) == 2.5
        # voxel (0, 0, k) of the NIfTI, in LPS
        for k in (0, orig.shape[2] - 1):
            ras = original.affine @ [0, 0, k, 1]
            np.testing.assert_allclose([float(x) for x in headers[k].ImagePositionPatient], [-ras[0], -ras[1], ras[2]], atol=1e-6)
        arr, aff = read_series(os.path.dirname(s.files[0]))  # SimpleITK / GDCM
        np.testing.assert_allclose(aff, original.affine, atol=1e-5)
        assert np.array_equal(arr, orig)
        img = LoadImage(reader="ITKReader", image_only=True)(os.path.dirname(s.files[0]))  # MONAI on the folder
        assert_same_world(np.asarray(img), np.asarray(img.affine), orig, original.affine)
    # same data -> same UIDs (re-uploading does not duplicate), different case -> different UIDs
    again = convert_case(case_dir, tmp_path / "again")
    assert again.study_uid == info.study_uid and again.series["flair"].series_uid == info.series["flair"].series_uid
    other = convert_case(synth / "brats2021" / "BraTS2021_00001", tmp_path / "other")
    assert other.study_uid != info.study_uid


def test_msd_4d_input_maps_channels_to_modalities(synth, tmp_path):
    msd_image = synth / "msd" / "imagesTr" / "BRATS_001.nii.gz"
    info = convert_case(msd_image, tmp_path)
    vol = nib.load(msd_image)
    data = np.asanyarray(vol.dataobj)
    for m, c in zip(MODALITIES, (1, 2, 3, 0)):  # MSD channels: FLAIR, T1w, t1gd, T2w
        arr, aff = read_series(os.path.dirname(info.series[m].files[0]))
        assert_same_world(arr, aff, data[..., c], vol.affine)
    # the same case written in the 2021 layout gives the same voxels
    assert np.array_equal(data[..., 0], np.asanyarray(nib.load(synth / "brats2021" / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").dataobj))


@pytest.mark.parametrize(
    "kind",
    ["oblique", "left_handed", "float"],
)
def test_geometry_oblique_left_handed_and_float(tmp_path, kind):
    rng = np.random.default_rng(0)
    shape = (9, 7, 5)
    affine = np.eye(4)
    if kind == "oblique":
        affine[:3, :3] = rotation((20, -35, 50)) @ np.diag([0.9, 1.2, 3.0])
        affine[:3, 3] = [-12.5, 40.25, -7.0]
    elif kind == "left_handed":
        affine[:3, :3] = np.diag([2.0, -1.5, 3.0])  # one flipped axis: slices stacked against the normal
        affine[:3, 3] = [5.0, 10.0, -20.0]
    else:
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.2])
    volumes = {}
    for c, m in enumerate(MODALITIES):
        if kind == "float":
            arr = (rng.normal(100.0 * (c + 1), 30.0, shape)).astype(np.float32)
        else:
            arr = rng.integers(-500 if c == 0 else 0, 3000, shape).astype(np.int16)
        volumes[m] = (arr, affine)
    case = _case(tmp_path / "in", f"case-{kind}", volumes)
    info = write_study(case, volumes, tmp_path / "out")
    for m in MODALITIES:
        arr, aff = read_series(os.path.dirname(info.series[m].files[0]))
        orig = volumes[m][0]
        step = (float(orig.max()) - float(orig.min())) / 65535 if kind == "float" else 0.0
        assert_same_world(arr, aff, orig, affine, values_atol=step / 2 + 1e-4)
    if kind == "left_handed":
        g = plane_geometry(affine, shape)
        slice_step = (RAS_TO_LPS @ affine)[:3, 2]
        assert float(g["normal"] @ slice_step) < 0  # really stacked against the normal


def test_sheared_affine_refused(tmp_path):
    affine = np.eye(4)
    affine[0, 1] = 0.5
    vol = {m: (np.zeros((4, 4, 3), np.int16), affine) for m in MODALITIES}
    with pytest.raises(DicomConversionError, match="sheared"):
        write_study(_case(tmp_path, "sheared", vol), vol, tmp_path / "out")


def test_cli_writes_study_and_rejects_non_case(synth, tmp_path, capsys):
    assert dicom_main([str(synth / "brats2021"), "--case", "BraTS2021_00001", "--out", str(tmp_path)]) == 0
    study = json.loads((tmp_path / "BraTS2021_00001" / "study.json").read_text())
    assert set(study["series"]) == set(MODALITIES) and all(s["instances"] == 62 for s in study["series"].values())
    with pytest.raises(SystemExit) as e:
        dicom_main([str(tmp_path), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "not a BraTS case folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "description, modality",
    [
        ("T1", "t1"), ("T1w", "t1"), ("t1n", "t1"), ("sag T1 MPRAGE", "t1"), ("T1 sequence", "t1"),
        ("T1ce", "t1ce"), ("t1c", "t1ce"), ("T1 post Gd", "t1ce"), ("AX T1+C", "t1ce"), ("t1gd", "t1ce"), ("T1_CE_3D", "t1ce"),
        ("T2", "t2"), ("T2w", "t2"), ("ax_t2_tse", "t2"),
        ("FLAIR", "flair"), ("AX T2 FLAIR", "flair"), ("t2f", "flair"), ("T2-FLAIR", "flair"),
        ("DWI b1000", None), ("localizer", None), ("", None),
        # scanner and archive names: pre-contrast words, contrast before T1, BIDS, T1 FLAIR, T2*
        ("SAG T1 PRE GD", "t1"), ("AX T1 PRE GAD", "t1"), ("T1 native", "t1"), ("T1 w/o", "t1"), ("AX T1 POST GD", "t1ce"),
        ("CT1", "t1ce"), ("ceT1", "t1ce"), ("Gd-T1", "t1ce"), ("MPRAGE_GD", "t1ce"), ("3D T1 BRAVO +C", "t1ce"), ("T1W_3D_TFE_GD", "t1ce"),
        ("sub-01_ce-gadolinium_T1w", "t1ce"), ("sub-01_ses-pre_ce-gd_T1w", "t1ce"), ("sub-01_T1w", "t1"), ("sub-01_T2w", "t2"),
        ("UPENN-GBM-00001_11_T1GD", "t1ce"), ("BraTS-GLI-00001-000-t1c", "t1ce"), ("BraTS-GLI-00001-000-t2f", "flair"),
        ("AX T1 FLAIR", "t1"), ("T1W_FLAIR_SAG", "t1"), ("AX T1 FLAIR POST", "t1ce"), ("T2*", None), ("AX T2* GRE", None), ("T2 star", None), ("SWI", None),
        # contrast word before the sequence, Siemens "KM", Philips "sT1W", post-operative, not structural
        ("POST GAD AX T1", "t1ce"), ("OAx T1 FLAIR+C", "t1ce"), ("t1_se_tra_KM", "t1ce"), ("t1_fl3d_tra_KM", "t1ce"),
        ("sT1W_3D_FFE", "t1"), ("sT1W_3D_TFE_GD", "t1ce"), ("sT2W_TSE", "t2"), ("T1 POST OP", "t1"), ("POST-OP T1 POST GD", "t1ce"),
        ("DCE T1 perf", None), ("t1_vibe_dyn", None), ("T1 MAP", None), ("AX T1 POST MIP", None), ("T2 DWI", None), ("PD/T2", None),
        ("ep2d_diff_trace", None),
    ],
)
def test_series_description_rules(description, modality):
    assert classify(description, parse_rules(None)) == modality


def test_match_series_errors_list_what_was_found():
    rules = parse_rules(None)
    series = [{"SeriesInstanceUID": str(i), "SeriesDescription": d, "SeriesNumber": i, "Modality": "MR"} for i, d in enumerate(["T1", "T1 post", "FLAIR", "DWI"], 1)]
    with pytest.raises(SeriesMatchError) as e:
        match_series(series, rules, "study 1.2.3")
    msg = str(e.value)
    assert "no series for T2" in msg and "'DWI' (MR) -> no modality" in msg and "'T1 post' (MR) -> T1ce" in msg
    with pytest.raises(SeriesMatchError, match="2 series of the same size match T1ce"):
        match_series(series + [{"SeriesInstanceUID": "9", "SeriesDescription": "T1ce", "SeriesNumber": 9}], rules)
    # allow_missing (the DICOMweb datastore): FLAIR or T2 is enough, two series for one modality are not
    assert list(match_series(series, rules, allow_missing=True)) == ["t1", "t1ce", "flair"]
    with pytest.raises(SeriesMatchError, match="no series for T2, FLAIR .*need one series of FLAIR or T2"):
        match_series(series[:2], rules, allow_missing=True)
    with pytest.raises(SeriesMatchError, match="2 series of the same size match T1ce"):
        match_series(series + [{"SeriesInstanceUID": "9", "SeriesDescription": "T1ce", "SeriesNumber": 9}], rules, allow_missing=True)
    custom = parse_rules('{"t2":"^DWI$"}')  # configurable: DWI stands in for T2 here
    assert match_series(series, custom)["t2"]["SeriesDescription"] == "DWI"
    with pytest.raises(ValueError, match="unknown modality"):
        parse_rules('{"pd":"x"}')


def test_match_series_uses_the_largest_of_several():
    """A 3D T1ce beside its reformat and an axial 2D T1ce: the series with the most instances is used, the others
    are named; a tie stays an error. A dynamic T1 series, larger than all, is no T1."""
    rules = parse_rules(None)
    series = [{"SeriesInstanceUID": str(n), "SeriesDescription": d, "SeriesNumber": n, "Modality": "MR", "instances": k}
              for n, d, k in [(2, "AX T1 PRE GD", 24), (3, "AX FLAIR", 24), (5, "AX T1 POST GD", 24), (6, "SAG 3D T1 POST GD", 176),
                              (7, "COR T1 POST GD MPR", 120), (8, "AX T2* GRE", 24), (9, "AX T2 FSE", 24), (10, "DCE T1 perf", 1200)]]
    found = match_series(series, rules, "study 1.2.3", allow_missing=True)
    assert {m: s["SeriesNumber"] for m, s in found.items()} == {"t1": 2, "t1ce": 6, "t2": 9, "flair": 3}
    assert found["t1ce"]["passed_over"] == ["#7 'COR T1 POST GD MPR' (120 instances)", "#5 'AX T1 POST GD' (24 instances)"]
    tied = [dict(s, instances=24) if s["SeriesNumber"] == 6 else s for s in series if s["SeriesNumber"] != 7]
    with pytest.raises(SeriesMatchError, match="2 series of the same size match T1ce.*'AX T1 POST GD'.*'SAG 3D T1 POST GD'"):
        match_series(tied, rules, "study 1.2.3", allow_missing=True)


# ----------------------------------------------------------------------------------------- Orthanc


def _install(what: str, fn) -> float:
    """Run an installer; skip (with the reason) when the packages cannot be installed here."""
    try:
        seconds = fn()
    except AptUnavailable as e:
        pytest.skip(f"{what} unavailable: {e}")
    if seconds:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with open(ARTIFACTS / "install_times.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}: installed in {seconds:.1f} s\n")
    return seconds


@pytest.fixture(scope="module")
def orthanc():
    """A real Orthanc on a free loopback port with the project's config and a temporary database."""
    from devtools.orthanc import ensure_installed

    _install("Orthanc", ensure_installed)
    with Orthanc() as pacs:
        yield pacs


RAW_SEED, RAW_NAMES = 5, {"t1": "T1_MPRAGE", "t1ce": "3D_T1_POST_GD", "t2": "AX_T2_TSE", "flair": "T2_FLAIR_SAG"}


@pytest.fixture(scope="module")
def raw_study(tmp_path_factory):
    """Generated case 0 of seed 5 as it comes from the scanner (custom.synthetic.raw_study: a head, each
    series on its own grid, orientation and pose; half resolution), files named as a clinic names them;
    and the BraTS-ready version of the same case."""
    root = tmp_path_factory.mktemp("raw_study")
    raw = generate_raw_study(0, RAW_SEED, root / "raw", size="small", voxel_scale=2.0)
    folder = root / "RAW0"
    folder.mkdir()
    for seq, path in raw.series.items():
        (folder / f"{RAW_NAMES[seq]}.nii.gz").symlink_to(path)
    write_dataset(root / "ready", 1, seed=RAW_SEED, layout="brats2021", size="small")
    return raw, folder, root / "ready" / "BraTS2021_00000"


@pytest.fixture(scope="module")
def uploaded(orthanc, synth, raw_study, tmp_path_factory):
    """Case 0 as a complete study; case 1 with only its T1ce and FLAIR series (issue #13: accepted,
    T1 and T2 zero-filled); a third study with only T1 and T1ce series (refused: no FLAIR, no T2);
    a study as it comes from the scanner (series on their own grids, skull present)."""
    out = tmp_path_factory.mktemp("dicom_upload")
    raw = convert_study_folder(raw_study[1], out)
    stow([f for s in raw.series.values() for f in s.files], orthanc.dicomweb_url)
    full = convert_case(synth / "brats2021" / "BraTS2021_00000", out)
    assert stow([f for s in full.series.values() for f in s.files], orthanc.dicomweb_url) == 4 * 62
    partial = convert_case(synth / "brats2021" / "BraTS2021_00001", out)
    stow([f for m, s in partial.series.items() if m in ("t1ce", "flair") for f in s.files], orthanc.dicomweb_url)
    case, volumes = load_case(synth / "brats2021" / "BraTS2021_00001")
    volumes = {m: (v + 1, a) for m, (v, a) in volumes.items()}  # other voxels: another study
    refused = write_study(BraTSCase("BraTS2021_00009", case.images, None, case.layout), volumes, out)
    stow([f for m, s in refused.series.items() if m in ("t1", "t1ce") for f in s.files], orthanc.dicomweb_url)
    return {"full": full, "partial": partial, "refused": refused, "raw": raw}


def _qido(orthanc, path, **params):
    r = requests.get(f"{orthanc.dicomweb_url}/{path}", params=params, timeout=30)
    r.raise_for_status()
    return r.json() if r.text else []


def test_orthanc_stores_and_lists_the_study(orthanc, uploaded, synth, tmp_path):
    full = uploaded["full"]
    series = _qido(orthanc, f"studies/{full.study_uid}/series")
    found = {s["0008103E"]["Value"][0]: s["0020000E"]["Value"][0] for s in series}
    assert found == {SEQUENCE_NAMES[m]: s.series_uid for m, s in full.series.items()}
    assert all(s["00201209"]["Value"][0] == 62 for s in series)  # NumberOfSeriesRelatedInstances
    # the CLI uploads too; re-uploading the same case adds nothing (same UIDs)
    before = requests.get(f"{orthanc.url}/statistics", timeout=10).json()["CountInstances"]
    assert dicom_main([str(synth / "brats2021" / "BraTS2021_00000"), "--out", str(tmp_path), "--stow", orthanc.dicomweb_url]) == 0
    assert requests.get(f"{orthanc.url}/statistics", timeout=10).json()["CountInstances"] == before
    # an instance comes back through WADO-RS with the pixel data written
    ds = pydicom.dcmread(full.series["flair"].files[30])
    r = requests.get(
        f"{orthanc.dicomweb_url}/studies/{full.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30,
    )
    assert r.status_code == 200 and ds.PixelData in r.content


def test_orthanc_answers_loopback_only(orthanc):
    """Orthanc 1.10 listens on every interface (no bind-address option); RemoteAccessAllowed=false
    refuses clients that are not on loopback."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        address = None
    if not address or address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this machine")
    r = requests.get(f"http://{address}:{orthanc.port}/dicom-web/studies", timeout=10)
    assert r.status_code in (401, 403), r.status_code
    assert requests.get(f"{orthanc.dicomweb_url}/studies", timeout=10).status_code == 200


# ------------------------------------------------------------------------ the datastore, in-process


def _datastore(orthanc, cache: Path, search_filter=None, prepared_spacing: float = 1.0):
    from monailabel.datastore.dicom import DICOMwebClientX

    from lib.datastore.dicomweb import BraTSDICOMwebDatastore

    client = DICOMwebClientX(url=orthanc.dicomweb_url)
    return BraTSDICOMwebDatastore(client, search_filter or {"Modality": "CT"}, LAYOUTS["brats2023"], cache_path=str(cache),
                                  prepared_spacing=prepared_spacing)


@pytest.fixture(scope="module")
def datastore(orthanc, uploaded, tmp_path_factory):
    return _datastore(orthanc, tmp_path_factory.mktemp("dicomweb_cache"))


def _brats2023_label(case_dir: Path) -> nib.Nifti1Image:
    seg = nib.load(case_dir / f"{case_dir.name}_seg.nii.gz")
    data = np.asanyarray(seg.dataobj).copy()
    data[data == 4] = 3  # 2021 -> 2023 convention (ET 4 -> 3)
    return nib.Nifti1Image(data.astype(np.uint8), seg.affine)


def test_datastore_lists_complete_studies_by_flair_series_and_resolves_aliases(datastore, uploaded):
    from fastapi import HTTPException

    full, partial, refused = uploaded["full"], uploaded["partial"], uploaded["refused"]
    flair = full.series["flair"].series_uid
    assert datastore.search_filter["Modality"] == "MR"  # MONAI Label's CT default is overridden
    assert datastore.list_images() == sorted([flair, partial.series["flair"].series_uid, uploaded["raw"].series["flair"].series_uid])
    for alias in (flair, full.study_uid, full.series["t1"].series_uid, full.series["t1ce"].series_uid):
        assert datastore.require_image(alias) == flair
    # a study with only T1ce and FLAIR is an image (issue #13); its input is those two series
    assert datastore.require_image(partial.study_uid) == partial.series["flair"].series_uid
    assert datastore.model_sequences(partial.series["t1ce"].series_uid) == ["t1ce", "flair"]
    assert datastore.model_sequences(flair) == list(MODALITIES)
    for bad, status in (("../etc/passwd", 400), ("1.2.3.4.5", 404), (refused.study_uid, 422), (refused.series["t1"].series_uid, 422)):
        with pytest.raises(HTTPException) as e:
            datastore.require_image(bad)
        assert e.value.status_code == status, (bad, e.value.detail)
    detail = str(e.value.detail)
    assert "no series for T2, FLAIR" in detail and "'T1ce' (MR) -> T1ce" in detail and "'T1' (MR) -> T1" in detail, detail
    assert "need one series of FLAIR or T2" in detail, detail


def test_datastore_model_input_is_the_case_in_its_geometry(datastore, uploaded, synth):
    paths = datastore.model_input(uploaded["full"].study_uid)
    assert len(paths) == 4
    case_dir = synth / "brats2021" / "BraTS2021_00000"
    for m, p in zip(MODALITIES, paths):
        got, want = nib.load(p), nib.load(case_dir / f"BraTS2021_00000_{m}.nii.gz")
        assert_same_world(np.asanyarray(got.dataobj), got.affine, np.asanyarray(want.dataobj), want.affine)
    assert datastore.model_input(uploaded["full"].series["flair"].series_uid) == paths  # cached
    image = nib.load(datastore.get_image_uri(uploaded["full"].series["t2"].series_uid))  # what clients download: the FLAIR
    assert np.array_equal(np.asanyarray(image.dataobj), np.asanyarray(nib.load(paths[3]).dataobj))


def test_datastore_label_to_dicom_seg_and_back(datastore, orthanc, uploaded, synth, tmp_path):
    from fastapi import HTTPException

    full = uploaded["full"]
    flair = full.series["flair"].series_uid
    label = _brats2023_label(synth / "brats2021" / "BraTS2021_00000")
    assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 1, 2, 3}
    path = tmp_path / "label.nii.gz"
    nib.save(label, path)
    assert datastore.save_label(full.series["t1ce"].series_uid, str(path), "final", {}) == flair
    segs = _qido(orthanc, "series", Modality="SEG")
    assert len(segs) == 1 and segs[0]["0008103E"]["Value"][0] == "BraTS segmentation (final)"
    seg_uid = segs[0]["0020000E"]["Value"][0]
    seg = _retrieve_seg(orthanc, full.study_uid, seg_uid)
    assert seg.StudyInstanceUID == full.study_uid and seg.FrameOfReferenceUID == full.frame_of_reference_uid
    assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [full.series[m].series_uid for m in ("flair", "t1", "t1ce", "t2")]
    assert [(s.SegmentNumber, s.SegmentLabel, s.SegmentDescription) for s in seg.SegmentSequence] == [
        (1, "necrotic tumour core", "NCR"), (2, "peritumoral oedema", "ED"), (3, "enhancing tumour", "ET")]
    decoded = decode_seg(seg, {"necrotic tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 3})
    assert_same_world(*decoded, np.asanyarray(label.dataobj), label.affine)
    # a fresh server (empty cache) finds the label in the PACS and decodes it
    fresh = _datastore(orthanc, tmp_path / "fresh")
    assert fresh.get_labeled_images() == [flair]
    assert fresh.get_unlabeled_images() == sorted(uploaded[k].series["flair"].series_uid for k in ("partial", "raw"))
    got = nib.load(fresh.get_label_uri(flair, "final"))
    assert_same_world(np.asanyarray(got.dataobj), got.affine, np.asanyarray(label.dataobj), label.affine)
    (item,) = fresh.datalist()
    assert len(item["image"]) == 4 and item["label"].endswith(".nii.gz")
    # refused labels
    bad = tmp_path / "bad.nii.gz"
    for img, status in ((nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), label.affine), 422),
                        (nib.Nifti1Image((np.asanyarray(label.dataobj) > 0).astype(np.uint8) * 4, label.affine), 422)):
        nib.save(img, bad)
        with pytest.raises(HTTPException) as e:
            datastore.save_label(flair, str(bad), "final", {})
        assert e.value.status_code == status, e.value.detail
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(HTTPException) as e:
        datastore.save_label(flair, str(tmp_path / "x.txt"), "final", {})
    assert e.value.status_code == 415
    # an all-background label is kept locally, no SEG (a SEG needs a segment)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), bad)
    datastore.save_label(flair, str(bad), "empty", {})
    assert len(_qido(orthanc, "series", Modality="SEG")) == 1


def test_datastore_accepts_ohif_label_bin(datastore, orthanc, uploaded, synth, tmp_path):
    """OHIF saves a label as ``label.bin``: the raw uint8 voxels of the image volume (x fastest)."""
    full = uploaded["full"]
    label = _brats2023_label(synth / "brats2021" / "BraTS2021_00000")
    data = np.asanyarray(label.dataobj).astype(np.uint8)
    data[data == 1] = 2  # a corrected label: no necrotic core
    path = tmp_path / "label.bin"
    path.write_bytes(data.tobytes(order="F"))
    before = {s["0020000E"]["Value"][0] for s in _qido(orthanc, "series", Modality="SEG")}
    datastore.save_label(full.series["flair"].series_uid, str(path), "final", {})
    (new,) = [s["0020000E"]["Value"][0] for s in _qido(orthanc, "series", Modality="SEG") if s["0020000E"]["Value"][0] not in before]
    seg = _retrieve_seg(orthanc, full.study_uid, new)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["peritumoral oedema", "enhancing tumour"]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]  # numbered without gaps
    decoded = decode_seg(seg, {"peritumoral oedema": 2, "enhancing tumour": 3})
    assert_same_world(*decoded, data, label.affine)

def _retrieve_seg(orthanc, study_uid, seg_uid) -> pydicom.Dataset:
    from dicomweb_client.api import DICOMwebClient

    (seg,) = DICOMwebClient(orthanc.dicomweb_url).retrieve_series(study_uid, seg_uid)
    return seg


def decode_seg(seg: pydicom.Dataset, values: dict) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM SEG -> (label map with ``values`` by SegmentLabel, RAS affine), with pydicom-seg alone."""
    import pydicom_seg

    result = pydicom_seg.SegmentReader().read(seg)
    out, affine = None, None
    for number, info in result.segment_infos.items():
        img = result.segment_image(number)
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        if out is None:
            out, affine = np.zeros(arr.shape, np.uint8), itk_affine(img)
        assert np.allclose(itk_affine(img), affine)
        assert not out[arr > 0].any(), "segments overlap"
        out[arr > 0] = values[info.SegmentLabel]
    return out, affine


# ------------------------------------------------------------------ a real MONAI Label server on it


def _bundle_copy(root: Path) -> Path:
    """The repo's bundle configs and its shipped weights (models/model.pt)."""
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    (root / "models").mkdir(parents=True)
    shutil.copy2(REPO / "bundle" / "models" / "model.pt", root / "models" / "model.pt")
    return root


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, 15)  # the launcher starts python as a child: stop the whole group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture(scope="module")
def server(orthanc, uploaded, tmp_path_factory):
    """``monailabel start_server --studies http://127.0.0.1:PORT/dicom-web`` (Orthanc), shipped model, crf off."""
    from devtools.orthanc import free_port

    tmp = tmp_path_factory.mktemp("mlapp_dicomweb")
    bundle_root = _bundle_copy(tmp / "bundle")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        MONAI_LABEL_DICOMWEB_SEARCH_FILTER='{"Modality":"MR"}',  # MONAI Label's default is CT
        MONAI_LABEL_DICOMWEB_CACHE_PATH=str(tmp / "cache"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )
    cmd = [
        str(VENV_BIN / "monailabel"), "start_server", "--app", str(APP), "--studies", orthanc.dicomweb_url,
        "--host", "127.0.0.1", "--port", str(port),
        "--conf", "models", MODEL, "--conf", "bundle_root", str(bundle_root), "--conf", "bundle_configs", CONFIGS,
        "--conf", "bundle_overrides", json.dumps(OVERRIDES, separators=(",", ":")),
        "--conf", "dicomweb_prepared_spacing", "2.0",  # the raw study is at half resolution
    ]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-4000:]}")
            try:
                requests.get(f"{url}/info/", timeout=10).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not up after {STARTUP_TIMEOUT} s:\n{(tmp / 'server.log').read_text()[-4000:]}")
                time.sleep(1)
        yield {"url": url, "tmp": tmp, "log": tmp / "server.log"}
    finally:
        _stop(proc)
        log.close()


def _multipart(r) -> dict:
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {}
    for part in MultipartDecoder.from_response(r).parts:
        name = part.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]
        parts[name] = part.content
    return parts


def _infer(server, tmp: Path, image: str = "", params=None, file: Path | None = None):
    """POST /infer/brats -> (label array, affine, result json)."""
    files = {"file": (file.name, open(file, "rb"))} if file else None
    r = requests.post(f"{server['url']}/infer/{MODEL}", params={"image": image, "output": "all"}, data={"params": json.dumps(params or {})}, files=files, timeout=600)
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    out = tmp / f"result_{time.monotonic_ns()}.nii.gz"
    out.write_bytes(parts["image"])
    img = nib.load(out)
    return np.asarray(img.dataobj), img.affine, json.loads(parts["params"])


def test_server_info_lists_the_study_and_its_labels(server, uploaded):
    info = requests.get(f"{server['url']}/info/", timeout=10).json()
    assert info["models"][MODEL]["labels"] == {"necrotic tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 3}
    r = requests.get(f"{server['url']}/datastore/image/info", params={"image": uploaded["full"].study_uid}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["SeriesInstanceUID"] == uploaded["full"].series["flair"].series_uid
    assert r.json()["series"] == {SEQUENCE_NAMES[m]: s.series_uid for m, s in uploaded["full"].series.items()}


def test_infer_on_dicom_study_stores_a_seg_matching_the_nifti_inference(server, orthanc, uploaded, synth, tmp_path):
    full = uploaded["full"]
    case_dir = synth / "brats2021" / "BraTS2021_00000"
    # inference on the DICOM study (OHIF sends the UID of the series on screen: here the T1ce), result saved back
    pred, pred_affine, result = _infer(server, tmp_path, full.series["t1ce"].series_uid, {"crf": False, "save_label": True})
    assert result["crf"] is False
    assert set(np.unique(pred).tolist()) - {0} and set(np.unique(pred).tolist()) <= {0, 1, 2, 3}, "the shipped model predicts nothing: no SEG to compare"
    # the NIfTI inference of the same case on the same server: the four original files as one 4D upload
    stack = np.stack([np.asanyarray(nib.load(case_dir / f"BraTS2021_00000_{m}.nii.gz").dataobj) for m in MODALITIES], axis=-1)
    affine = nib.load(case_dir / "BraTS2021_00000_flair.nii.gz").affine
    four_d = tmp_path / "BraTS2021_00000_4d.nii.gz"
    nib.save(nib.Nifti1Image(stack, affine), four_d)
    ref, ref_affine, _ = _infer(server, tmp_path, params={"crf": False}, file=four_d)
    np.testing.assert_allclose(ref_affine, affine, atol=1e-4)
    assert_same_world(pred, pred_affine, ref, ref_affine)
    # the DICOM SEG in Orthanc, decoded into the image grid, is that label map
    segs = [s for s in _qido(orthanc, "series", Modality="SEG") if s["0008103E"]["Value"][0] == "BraTS segmentation (original)"]
    assert len(segs) == 1, segs
    seg = _retrieve_seg(orthanc, full.study_uid, segs[0]["0020000E"]["Value"][0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == full.series["flair"].series_uid
    assert seg.FrameOfReferenceUID == full.frame_of_reference_uid
    labels = requests.get(f"{server['url']}/info/", timeout=10).json()["models"][MODEL]["labels"]
    present = sorted(set(np.unique(ref).tolist()) - {0})
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [n for n, v in sorted(labels.items(), key=lambda x: x[1]) if v in present]
    decoded, decoded_affine = decode_seg(seg, labels)
    assert_same_world(decoded, decoded_affine, ref, ref_affine)


def test_infer_on_study_with_only_flair_and_t1ce_says_which_sequences_it_used(server, uploaded, tmp_path):
    partial = uploaded["partial"]
    pred, affine, result = _infer(server, tmp_path, partial.study_uid, {"crf": False})
    assert result["sequences"] == ["t1ce", "flair"]
    flair = nib.load(requests_image(server, partial.study_uid, tmp_path))
    assert pred.shape == flair.shape[:3] and np.allclose(affine, flair.affine, atol=1e-4)


def requests_image(server, image_id: str, tmp: Path) -> Path:
    """GET /datastore/image -> a file (what a client downloads: the FLAIR)."""
    r = requests.get(f"{server['url']}/datastore/image", params={"image": image_id}, timeout=60)
    assert r.status_code == 200, r.text
    out = tmp / f"image_{time.monotonic_ns()}.nii.gz"
    out.write_bytes(r.content)
    return out


def test_infer_on_study_missing_a_modality_says_what_was_found(server, uploaded):
    r = requests.post(f"{server['url']}/infer/{MODEL}", params={"image": uploaded["refused"].study_uid}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "no series for T2, FLAIR" in detail and "'T1' (MR) -> T1" in detail and "dicomweb_series_rules" in detail, detail
    r = requests.post(f"{server['url']}/infer/{MODEL}", params={"image": "1.2.3.999"}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 404, r.text


def test_infer_on_a_raw_study_prepares_it_and_stores_a_seg_on_the_flair_series(server, orthanc, uploaded, raw_study, tmp_path):
    """Issue #16: series on their own grids are co-registered onto the T1ce (the reference series),
    brain-extracted and segmented; the label and its DICOM SEG lie on the FLAIR series (carried there
    through the FLAIR's registration) and agree with the segmentation of the BraTS-ready version of
    the case carried onto that series through the generator's true pose."""
    info = uploaded["raw"]
    raw, _, ready_dir = raw_study
    assert {s.description for s in info.series.values()} == set(RAW_NAMES.values())
    pred, affine, result = _infer(server, tmp_path, info.series["t1ce"].series_uid, {"crf": False, "save_label": True})
    assert result["sequences"] == list(MODALITIES)
    flair = nib.load(requests_image(server, info.study_uid, tmp_path))  # what the viewer shows: the FLAIR series
    assert pred.shape == flair.shape[:3] and np.allclose(affine, flair.affine, atol=1e-3), (pred.shape, flair.shape)
    source = nib.load(raw.series["flair"])  # the same series in the PACS (GDCM may order its slices the other way)
    assert_same_world(np.asanyarray(flair.dataobj), flair.affine, np.asanyarray(source.dataobj), source.affine)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2, 3}
    log = server["log"].read_text()
    assert f"study {info.study_uid}: series on different grids" in log and "preparing onto T1ce, results on FLAIR" in log, log[-3000:]
    assert "prepared in" in log and "registered T1 " in log and "registered T1ce" not in log, log[-3000:]
    # the BraTS-ready case through the same server (one 4D upload), carried onto the FLAIR series
    stack = np.stack([np.asanyarray(nib.load(ready_dir / f"BraTS2021_00000_{m}.nii.gz").dataobj) for m in MODALITIES], axis=-1)
    four_d = tmp_path / "ready_4d.nii.gz"
    nib.save(nib.Nifti1Image(stack, nib.load(ready_dir / "BraTS2021_00000_flair.nii.gz").affine), four_d)
    ready, ready_affine, _ = _infer(server, tmp_path, params={"crf": False}, file=four_d)
    m = np.linalg.inv(ready_affine) @ np.linalg.inv(raw.poses["flair"]) @ flair.affine  # FLAIR voxel -> head frame -> ready voxel
    carried = ndi.affine_transform(ready.astype(np.uint8), m[:3, :3], m[:3, 3], pred.shape, order=0)
    wt, wt_ready = pred > 0, carried > 0
    assert wt_ready.sum() > 100, "the BraTS-ready prediction has no tumour to compare"
    dice = 2.0 * (wt & wt_ready).sum() / (wt.sum() + wt_ready.sum())
    assert dice >= 0.8, dice
    # the DICOM SEG in the PACS references the FLAIR series and decodes to the returned label
    (seg_series,) = _qido(orthanc, f"studies/{info.study_uid}/series", Modality="SEG")
    seg = _retrieve_seg(orthanc, info.study_uid, seg_series["0020000E"]["Value"][0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series["flair"].series_uid
    assert seg.FrameOfReferenceUID == info.frame_of_reference_uid
    labels = {"necrotic tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 3}
    decoded, decoded_affine = decode_seg(seg, labels)
    assert_same_world(decoded, decoded_affine, pred, affine)
    # training: a final label drawn on the FLAIR (here the prediction) reaches the prepared grid through the FLAIR's
    # registration (the server's prepared study, from its cache), where it matches the label carried by the true pose
    store = _datastore(orthanc, server["tmp"] / "cache", {"Modality": "MR"}, prepared_spacing=2.0)  # the server's cache and grid
    (cached,) = (server["tmp"] / "cache").glob(f"*/prepared/{info.series['flair'].series_uid}/preparation.json")
    prepared_at = cached.stat().st_mtime
    final = tmp_path / "final_on_flair.nii.gz"
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), affine), final)
    store.save_label(info.series["flair"].series_uid, str(final), "final", {})
    report = store.prepared_study(info.series["flair"].series_uid)
    assert report["reference"]["sequence"] == "t1ce" and report["series"]["t1ce"]["registration"]["start"] == "reference"
    (item,) = [i for i in store.datalist() if i["sequences"] == list(MODALITIES) and "prepared" in i["label"]]
    on_grid = nib.load(item["label"])
    grid_affine = np.array(report["grid"]["affine_ras"])
    assert on_grid.shape == tuple(report["grid"]["shape"]) and np.allclose(on_grid.affine, grid_affine, atol=1e-4)
    m = np.linalg.inv(affine) @ raw.true_transform("flair") @ grid_affine  # prepared voxel -> T1ce world -> FLAIR world -> voxel
    truly = ndi.affine_transform(pred.astype(np.uint8), m[:3, :3], m[:3, 3], on_grid.shape, order=0) > 0
    got = np.asarray(on_grid.dataobj) > 0
    assert 2.0 * (got & truly).sum() / (got.sum() + truly.sum()) >= 0.9
    assert cached.stat().st_mtime == prepared_at  # the server's preparation, not a new one


# ---------------------------------------------------------------------------------------------- OHIF


@pytest.fixture(scope="module")
def chromium():
    _install("Chromium", lambda: apt_install(("chromium",), lambda: shutil.which("chromium") is not None, "Chromium"))
    return shutil.which("chromium")


def _chromium(binary: str, tmp: Path, url: str, *args: str, budget_ms: int = 30000) -> str:
    """Headless Chromium on ``url`` after ``budget_ms`` of virtual time (scripts, network); stdout."""
    cmd = [
        binary, "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu-sandbox",
        "--enable-unsafe-swiftshader", "--use-angle=swiftshader",  # software WebGL for cornerstone
        f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,900",
        f"--virtual-time-budget={budget_ms}", *args, url,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _text(html: str) -> str:
    import re

    html = re.sub(r"<(style|script)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_ohif_lists_the_studies_from_orthanc_and_shows_the_four_series(server, uploaded, chromium, tmp_path):
    """MONAI Label's OHIF (/ohif/) queries Orthanc through the server's /proxy/dicom: the study list
    shows the uploaded studies; the viewer of the complete study shows the four series and the SEG
    stored by the inference test. Screenshots: tests/artifacts/ohif_*.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ohif = f"{server['url']}/ohif/"
    text = _text(_chromium(chromium, tmp_path, ohif, "--dump-dom"))
    assert "Study List" in text, text[:2000]
    for info in uploaded.values():  # PatientName = case id
        assert info.case_id in text, f"{info.case_id} not in the study list: {text[:2000]}"
    _chromium(chromium, tmp_path, ohif, f"--screenshot={ARTIFACTS / 'ohif_study_list.png'}")
    assert (ARTIFACTS / "ohif_study_list.png").stat().st_size > 10_000
    viewer = f"{server['url']}/ohif/monai-label?StudyInstanceUIDs={uploaded['full'].study_uid}"
    text = _text(_chromium(chromium, tmp_path, viewer, "--dump-dom"))
    for description in ("T1", "T1ce", "T2", "FLAIR", "BraTS segmentation (original)"):
        assert f" {description} " in text, f"{description!r} not in the viewer: {text[:3000]}"
    assert "MONAI Label" in text
    _chromium(chromium, tmp_path, viewer, f"--screenshot={ARTIFACTS / 'ohif_viewer.png'}")
    from PIL import Image

    shot = np.asarray(Image.open(ARTIFACTS / "ohif_viewer.png").convert("L"), dtype=np.float64)
    viewport = shot[150:750, 300:1100]  # the three MPR viewports: the brain is drawn (not black)
    assert (viewport > 60).mean() > 0.05, "viewports look empty"


# centre of the innermost visible element matching ``sel`` whose text includes ``text`` (or null)
CENTRE = """((sel, text) => { const els = Array.from(document.querySelectorAll(sel)).filter(e => (e.textContent || '').includes(text) && e.getBoundingClientRect().width > 0);
    els.sort((a, b) => a.textContent.length - b.textContent.length);
    if (!els.length) return null; const r = els[0].getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })"""


def _click(b, xy, count=1):
    for c in range(1, count + 1):
        for kind in ("mousePressed", "mouseReleased"):
            b.call("Input.dispatchMouseEvent", type=kind, x=xy[0], y=xy[1], button="left", clickCount=c)


def _browser(chromium, tmp_path):
    from devtools.cdp import Browser

    b = Browser(chromium, tmp_path / "profile")
    b.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    return b


def test_ohif_shows_the_seg_over_the_flair(server, uploaded, chromium, tmp_path):
    """OHIF's basic viewer, driven over the DevTools protocol (devtools/cdp.py): open the DICOM SEG of
    the inference, OHIF loads the FLAIR it references, the segmentation panel lists the segments
    by label name, jumping to a segment shows it coloured over the FLAIR. Screenshot:
    tests/artifacts/ohif_seg_overlay.png."""
    centre, click = CENTRE, _click
    labels = requests.get(f"{server['url']}/info/", timeout=10).json()["models"][MODEL]["labels"]
    with _browser(chromium, tmp_path) as b:
        b.call("Page.navigate", url=f"{server['url']}/ohif/viewer?StudyInstanceUIDs={uploaded['full'].study_uid}")
        seg = b.wait_for(f"({centre})('[data-cy=study-browser-thumbnail-no-image]', '(original)')", 90)
        assert seg, f"no SEG thumbnail in OHIF; console: {b.console()[-20:]}"
        hide = b.evaluate(f"({centre})('[data-cy=confirm-and-hide-button]', '')")
        if hide:
            click(b, hide)
        time.sleep(2)  # let the default hanging protocol settle before replacing it
        click(b, seg, count=2)
        yes = b.wait_for(f"({centre})('button', 'Yes')", 30)  # "Do you want to open this Segmentation?"
        assert yes, f"no prompt to open the SEG; console: {b.console()[-20:]}"
        click(b, yes)
        flair = b.wait_for("(document.querySelector('[data-cy=viewport-pane]')?.textContent || '').includes('FLAIR')", 60)
        assert flair, f"the SEG's referenced series (FLAIR) not loaded; console: {b.console()[-20:]}"
        panel = b.wait_for(f"({centre})('[data-cy=panelSegmentation-btn]', '')", 30)
        click(b, panel)
        names = [n for n in labels if b.wait_for(f"({centre})('body *', {json.dumps(n)})", 15)]
        assert names, f"no segment named after a label in OHIF's panel; console: {b.console()[-20:]}"
        slice_text = "(document.querySelector('[data-cy=viewport-overlay-bottom-right]')?.textContent || '')"
        click(b, b.evaluate(f"({centre})('body *', {json.dumps(names[0])})"))  # OHIF jumps to the segment's centre
        time.sleep(3)
        first = b.evaluate(slice_text)
        if first.startswith("I: 1 ") or first.startswith("I:1 "):  # no jump: scroll to the middle slice
            pane = b.evaluate(f"({centre})('[data-cy=viewport-pane]', '')")
            for _ in range(uploaded["full"].series["flair"].files.__len__() // 2):
                b.call("Input.dispatchMouseEvent", type="mouseWheel", x=pane[0], y=pane[1], deltaX=0, deltaY=120)
            time.sleep(2)
        shown = b.evaluate(slice_text)
        shot = b.screenshot(ARTIFACTS / "ohif_seg_overlay.png")
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)[100:780, 300:1100]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 80  # segment colours over a grey image
    assert coloured.mean() > 0.005, f"no coloured segment drawn over the image ({coloured.mean():.4f}; slice {first!r} after the jump, {shown!r} shown)"


def test_ohif_monai_label_panel_runs_the_model_on_the_study(server, uploaded, chromium, tmp_path):
    """OHIF's MONAI Label panel (monai-label mode): connect to the server (its URL in the panel's
    cookie; the panel's default is port 8000), *Run* model brats: OHIF posts the UID of the series on
    screen (T1) with output=image, the app runs on the study's four series, OHIF loads the label
    map as a segmentation. Screenshot: tests/artifacts/ohif_monai_label_run.png."""
    url = server["url"]
    with _browser(chromium, tmp_path) as b:
        b.call("Network.setCookie", name="MONAILABEL_SERVER_URL", value=f"{url}/", url=url)
        b.call("Page.navigate", url=f"{url}/ohif/monai-label?StudyInstanceUIDs={uploaded['full'].study_uid}")
        field = b.wait_for("document.getElementById('monailabelServerURL')?.value", 90)
        assert field == f"{url}/", field
        assert b.wait_for("(document.querySelector('[data-cy=viewport-pane]')?.textContent || '').includes('T1')", 60)
        hide = b.evaluate(f"({CENTRE})('[data-cy=confirm-and-hide-button]', '')")
        if hide:
            _click(b, hide)
        connect = b.evaluate("""(() => { const i = document.getElementById('monailabelServerURL'); const r = i.parentElement.parentElement.querySelector('button').getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()""")
        _click(b, connect)
        run = b.wait_for(f"({CENTRE})('button', 'Run')", 30)
        assert run, f"the panel did not connect; console: {b.console()[-20:]}"
        _click(b, run)
        deadline, done = time.monotonic() + 180, False
        while not done and time.monotonic() < deadline:
            time.sleep(1)
            b.evaluate("0")  # collect the events received meanwhile
            done = any("updated the segmentation's scalar data" in line for line in b.console())
        log = b.console()
        posts = [line for line in log if "POST:: " in line and "/infer/brats?image=" in line]
        assert posts and uploaded["full"].series["t1"].series_uid in posts[0], posts
        assert done, f"OHIF did not load the result; console: {[line for line in log if 'rror' in line][-10:]}"
        time.sleep(2)
        b.screenshot(ARTIFACTS / "ohif_monai_label_run.png")
