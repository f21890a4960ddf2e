"""Bad input wherever a file enters: the data layer, the bundle commands, MONAI Label uploads.

What "a clear error" means here, per entry point:

- data layer (``list_cases``/``validate_case``, ``load_nifti``/``load_voxels``/``check_image_voxels``,
  and the bundle's loader ``CheckedLoadImaged``): a ``BraTSDataError`` whose message starts with
  ``case <id>: <the file's path>:`` and says what is wrong; never another exception type;
- ``python -m custom.data DIR``: exit code 2 and ``error: case <id>: <file>: ...`` on stderr, no
  traceback;
- bundle commands (``python -m monai.bundle run training|evaluating|inference``): exit code != 0 and
  the *last line* of stderr is ``BraTSDataError: case <id>: <file>: <what is wrong>``. MONAI wraps
  errors raised while parsing a config or applying a transform in its own ``RuntimeError`` and
  prints its traceback; ``custom.data.errors.install_excepthook`` repeats our message after it, so nothing from a library
  comes after the explanation;
- MONAI Label uploads (``check_label_file``, ``CheckedLocalDatastore.add_image``): ``HTTPException``
  415 (not a readable NIfTI file) or 422 (a NIfTI file with a bad header or content) whose detail
  names the upload (``label for image 'X'``, ``image 'X'``), never the server's temporary path.

Oblique and anisotropic affines must work: the bundle's preprocessing (Orientationd + Spacingd)
puts a label drawn at a known world position at that world position, and inverting it gives the
input grid back (what inference does with its output).

Property-based tests (hypothesis) write real NIfTI files with random headers and arrays (shapes,
dtypes, scaling, oblique/anisotropic/degenerate affines, NaN/Inf/extreme/zero voxels, wrong
compression, truncation points) and check the outcome is success (with the very voxels written)
or the clear error above, and that what must fail fails.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import re
import resource
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BRATS_AFFINE, PYTHON, REPO, run_env, toy_label, toy_modalities, write_toy_dataset
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from monai.transforms import Compose

from custom import data as brats
from custom.data import CONVENTIONS, BraTSDataError, NotNiftiError, check_image_voxels, list_cases, load_nifti, load_voxels, nifti
from custom.synthetic import msd_dataset_json
from custom.synthetic.fields import rotation
from custom.transforms import CheckedLoadImaged, LabelToRegionsd
from custom.transforms.brain_edge import depth_in_brain_mm
from lib.datastore.brats import CheckedLocalDatastore, check_label_file, open_datastore  # noqa: E402

CONFIGS = REPO / "bundle" / "configs"
CID = "BraTS2021_00000"
SHAPE = (12, 10, 8)
INT_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]
FLOAT_DTYPES = ["float32", "float64"]
LOADER = CheckedLoadImaged(["image", "label"], image_only=True, ensure_channel_first=True, allow_missing_keys=True)
PROPERTY = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------
# writing NIfTI files with full control over the header
# ---------------------------------------------------------------------------------------------------------------


def nifti_bytes(data: np.ndarray, affine: np.ndarray = BRATS_AFFINE, slope: float | None = None, inter: float = 0.0, shape=None) -> bytes:
    """An uncompressed NIfTI-1 file holding ``data`` with exactly ``affine`` as its sform (NaN, singular
    or collinear affines are kept as they are, unlike ``nib.save``); ``shape`` overrides the header's
    dimensions (a header that lies about its size)."""
    data = np.asarray(data)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(shape or data.shape)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    zooms = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    pixdim = hdr["pixdim"].copy()
    pixdim[1:4] = np.where(np.isfinite(zooms) & (zooms > 0), zooms, 1.0)
    hdr["pixdim"] = pixdim
    hdr["vox_offset"] = 352
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    return hdr.binaryblock + b"\0\0\0\0" + data.tobytes(order="F")


def oblique_affine(angles, zooms, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """A voxel-to-world affine rotated by ``angles`` (degrees) with anisotropic voxel sizes ``zooms`` (mm)."""
    a = np.eye(4)
    a[:3, :3] = rotation(angles) @ np.diag(zooms)
    a[:3, 3] = origin
    return a


# ---------------------------------------------------------------------------------------------------------------
# known bad files, one at a time, in a BraTS 2021 case: data layer, bundle loader and CLI
# ---------------------------------------------------------------------------------------------------------------


def _t2(d: Path) -> Path:
    return d / f"{CID}_t2.nii.gz"


def _seg(d: Path) -> Path:
    return d / f"{CID}_seg.nii.gz"


def _put(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    return path


def _write(path: Path, data, affine=BRATS_AFFINE, **kw) -> Path:
    path.write_bytes(gzip.compress(nifti_bytes(np.asarray(data), affine, **kw), compresslevel=1))
    return path


def _t2_with(value, dtype=np.float32, where=(3, 4, 5)):
    arr = toy_modalities()[2].astype(dtype)
    arr[where] = value
    return arr


def _noise():  # incompressible voxels: a truncated gzip stream then loses voxels, not just the trailer
    return np.random.default_rng(0).integers(0, 30000, SHAPE).astype(np.int16)


def _replace(d: Path, name: str, body: bytes) -> Path:
    _t2(d).unlink()
    (d / name).write_bytes(body)
    return d / name


def _label_with(value, dtype):
    lab = toy_label().astype(dtype)
    lab[0, 0, 0] = value
    return lab


PNG = b"\x89PNG\r\n\x1a\n" + bytes(600)
# name: (corrupt(case_dir) -> the bad file, check level that finds it, message pattern, refused by the bundle's loader too)
BAD_FILES = {
    "uncompressed named .nii.gz": (lambda d: _put(_t2(d), nifti_bytes(toy_modalities()[2])), "header",
                                   r"not a readable NIfTI file \(named \.gz but not gzip-compressed; it is an uncompressed NIfTI file: rename it to \.nii\)", True),
    "gzip named .nii": (lambda d: _replace(d, f"{CID}_t2.nii", gzip.compress(nifti_bytes(toy_modalities()[2]))), "header",
                        r"not a readable NIfTI file \(gzip-compressed but named \.nii: rename it to \.nii\.gz\)", True),
    "empty file": (lambda d: _put(_t2(d), b""), "header", r"not a readable NIfTI file \(the file is empty\)", True),
    "PNG named .nii.gz": (lambda d: _put(_t2(d), gzip.compress(PNG)), "header", r"not a readable NIfTI file \(ImageFileError", True),
    "text named .nii.gz": (lambda d: _put(_t2(d), b"this is not a NIfTI file"), "header", r"not a readable NIfTI file \(named \.gz but not gzip-compressed; it starts with b'this'\)", True),
    "header cut short": (lambda d: _put(_t2(d), gzip.compress(nifti_bytes(toy_modalities()[2])[:200])), "header",
                         r"not a readable NIfTI file", True),
    "truncated .nii.gz": (lambda d: _put(_t2(d), gzip.compress(nifti_bytes(_noise()))[:1000]), "header",
                          r"truncated or corrupt NIfTI data", True),
    "truncated .nii": (lambda d: _replace(d, f"{CID}_t2.nii", nifti_bytes(_noise())[:-50]), "header",
                       r"truncated or corrupt NIfTI data \(the file has \d+ bytes, its header declares \d+\)", True),
    # a flipped bit keeps the header and the gzip size field: only reading the whole stream (CRC) finds it
    "flipped bit in the gzip stream": (lambda d: _put(_t2(d), bytes(b ^ (32 if i == 600 else 0) for i, b in enumerate(gzip.compress(nifti_bytes(_noise()))))),
                                       "full", r"truncated or corrupt NIfTI data \(BadGzipFile: CRC check failed|truncated or corrupt NIfTI data \(error", False),
    "NaN voxel": (lambda d: _write(_t2(d), _t2_with(np.nan)), "full", r"contains NaN or infinite voxels \(1 NaN, 0 infinite\)", True),
    "-Inf voxel": (lambda d: _write(_t2(d), _t2_with(-np.inf)), "full", r"contains NaN or infinite voxels \(0 NaN, 1 infinite\)", True),
    "float64 beyond float32": (lambda d: _write(_t2(d), _t2_with(1e300, np.float64)), "full", r"intensities up to 1e\+300 exceed 1e\+20", True),
    "float32 overflow-prone": (lambda d: _write(_t2(d), _t2_with(1e25)), "full", r"intensities up to 1e\+25 exceed 1e\+20", True),
    "all-zero image": (lambda d: _write(_t2(d), np.zeros(SHAPE, np.int16)), "full", r"all voxels are 0", True),
    "constant image": (lambda d: _write(_t2(d), np.full(SHAPE, 417, np.int16)), "full", r"all voxels equal 417 \(a constant, featureless image\)", True),
    "4D where 3D expected": (lambda d: _write(_t2(d), np.stack([toy_modalities()[2]] * 2, -1)), "header", r"expected a 3D image, got shape \(12, 10, 8, 2\)", True),
    "absurd size": (lambda d: _put(_t2(d), gzip.compress(nifti_bytes(np.zeros(8, np.int16), shape=(30000, 30000, 30000)))), "header",
                    r"the header declares \(30000, 30000, 30000\) voxels of int16 = 5.03e\+04 GiB, more than the 1 GiB limit \(BRATS_MAX_IMAGE_BYTES\); not read", True),
    "field of view of a whale": (lambda d: _write(_t2(d), toy_modalities()[2], np.diag([-60.0, -60.0, 60.0, 1.0])), "header",
                                 r"field of view \[720\. 600\. 480\.\] mm exceeds 500 mm", True),
    "NaN in the affine": (lambda d: _write(_t2(d), toy_modalities()[2], np.where(np.eye(4) == 1, np.nan, BRATS_AFFINE)), "header",
                          r"the voxel-to-world affine has NaN or infinite values", True),
    "singular affine": (lambda d: _write(_t2(d), toy_modalities()[2], np.diag([0.0, 1.0, 1.0, 1.0])), "header", r"degenerate voxel-to-world affine", True),
    "collinear voxel axes": (lambda d: _write(_t2(d), toy_modalities()[2], np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), "header",
                             r"degenerate voxel-to-world affine", True),
    "micrometre voxels": (lambda d: _write(_t2(d), toy_modalities()[2], np.diag([1e-4, 1e-4, 1e-4, 1.0])), "header", r"degenerate voxel-to-world affine", True),
    "complex voxels": (lambda d: _write(_t2(d), toy_modalities()[2].astype(np.complex64)), "header", r"voxel type complex64 is not supported", True),
    "RGB voxels": (lambda d: _write(_t2(d), np.zeros(SHAPE, [("R", "u1"), ("G", "u1"), ("B", "u1")])), "header", r"voxel type .* is not supported", True),
    "label int64 with a huge value": (lambda d: _write(_seg(d), _label_with(2**40 + 4, np.int64)), "full", r"label values \[1099511627780\] are not in the brats2021", False),
    "label float with a fraction": (lambda d: _write(_seg(d), _label_with(1.5, np.float32)), "full", r"label values \[1\.5\]", False),
    "label float with NaN": (lambda d: _write(_seg(d), _label_with(np.nan, np.float64)), "full", r"label values \[nan\]", False),
    "label with a negative value": (lambda d: _write(_seg(d), _label_with(-1, np.int16)), "full", r"label values \[-1\]", False),
    "4D label": (lambda d: _write(_seg(d), np.stack([toy_label()] * 2, -1)), "header", r"a label must be 3D, got shape \(12, 10, 8, 2\)", True),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_refused_naming_case_and_file(tmp_path, name):
    corrupt, level, pattern, at_load = BAD_FILES[name]
    write_toy_dataset(tmp_path, "brats2021", n=2)
    bad = corrupt(tmp_path / CID)
    if level == "full":
        list_cases(tmp_path, check="header")  # voxel problems do not show in headers: the cheap check passes
    with pytest.raises(BraTSDataError) as err:
        list_cases(tmp_path, check=level)
    assert str(err.value).startswith(f"case {CID}: {bad}: "), str(err.value)
    assert re.search(pattern, str(err.value)), str(err.value)
    assert isinstance(err.value, NotNiftiError) == ("not a readable NIfTI file" in pattern)
    # the bundle's loader (which reads datalists built with check="header") refuses it as well
    case = list_cases(tmp_path, check="none")[0]
    if at_load:
        with pytest.raises(BraTSDataError) as err:
            LOADER(case.to_dict())
        assert str(err.value).startswith(f"case {CID}: ") and str(bad) in str(err.value), str(err.value)
    elif "label" in name:  # label values are checked where they are converted to regions
        with pytest.raises(BraTSDataError, match=re.escape(str(bad)) + ".*label values"):
            LabelToRegionsd("label", "brats2021")(LOADER(case.to_dict()))


def test_absurd_size_is_refused_before_allocating_memory(tmp_path, monkeypatch):
    write_toy_dataset(tmp_path, "brats2021", n=1)
    BAD_FILES["absurd size"][0](tmp_path / CID)  # 30000^3 int16 = 50 TiB declared, 8 voxels stored
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(BraTSDataError, match="GiB limit"):
        list_cases(tmp_path, check="full")
    elapsed, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 2.0 and peak < 5 * 2**20, (elapsed, peak)
    # the limit is a setting (BRATS_MAX_IMAGE_BYTES in the environment): a toy case is 1920 bytes a modality
    write_toy_dataset(tmp_path / "ok", "brats2021", n=1)
    monkeypatch.setattr(nifti, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(BraTSDataError, match=r"\(12, 10, 8\) voxels of int16 = 1.79e-06 GiB, more than the 9.31e-07 GiB limit"):
        list_cases(tmp_path / "ok")


BOMB_MIB = 64  # what each bomb below expands to beyond its voxels (its file is about 0.1 MB)


def _bomb(path: Path, kind: str, data=None) -> Path:
    """A .nii.gz of ``data`` (a toy T2) that expands far beyond its voxels: ``vox_offset`` (the voxels
    placed BOMB_MIB MiB after the header), ``padding`` (zeros after the voxels, same gzip member) or
    ``members`` (an extra gzip member of zeros after the image's)."""
    data = toy_modalities()[2] if data is None else data
    body = nifti_bytes(data)
    zeros = b"\0" * 2**20
    with path.open("wb") as f:
        if kind == "members":
            f.write(gzip.compress(body, compresslevel=1))
        co = zlib.compressobj(9, zlib.DEFLATED, 31)  # one gzip member
        if kind == "vox_offset":
            hdr = bytearray(body[:348])
            hdr[108:112] = np.float32(352 + BOMB_MIB * 2**20).tobytes()
            f.write(co.compress(bytes(hdr) + b"\0\0\0\0"))
        elif kind == "padding":
            f.write(co.compress(body))
        for _ in range(BOMB_MIB):
            f.write(co.compress(zeros))
        if kind == "vox_offset":
            f.write(co.compress(body[352:]))
        f.write(co.flush())
    return path


@pytest.mark.parametrize("kind", ["vox_offset", "padding", "members"])
def test_decompression_bombs_are_refused_before_expanding(tmp_path, image_store, kind):
    """Data layer (the bundle's loader reads through it) and both uploads: refused, memory bounded."""
    write_toy_dataset(tmp_path, "brats2021", n=1)
    bomb = _bomb(tmp_path / CID / f"{CID}_t2.nii.gz", kind)
    assert bomb.stat().st_size < 2**20
    message = "vox_offset" if kind == "vox_offset" else "after the voxels its header declares"
    image = _bomb(tmp_path / "image.nii.gz", kind, np.stack([_noise() + 1] * 4, -1))
    label = _bomb(tmp_path / "label.nii.gz", kind, np.zeros(IMAGE_SHAPE, np.uint8))
    tracemalloc.start()
    with pytest.raises(BraTSDataError, match=f"case {CID}: {re.escape(str(bomb))}: .*{message}"):
        list_cases(tmp_path, check="full")
    with pytest.raises(BraTSDataError, match=message):
        CheckedLoadImaged(keys="image")({"image": [str(bomb)]})
    with pytest.raises(HTTPException) as image_err:
        image_store.add_image("bomb", str(image), {})
    with pytest.raises(HTTPException) as label_err:
        check_label_file(str(label), IMAGE_SHAPE, IMAGE_AFFINE, CONVENTIONS["brats2021"], WHERE)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 2**20, peak  # the bombs expand to 64 MiB
    for err, who in ((image_err, "image 'bomb'"), (label_err, WHERE)):
        assert err.value.status_code == 422 and err.value.detail.startswith(f"{who}: ") and message in err.value.detail, err.value.detail
    assert "bomb" not in image_store._datastore.objects


@pytest.mark.parametrize("dtype", INT_DTYPES + FLOAT_DTYPES)
def test_overflow_prone_dtypes_load_and_preprocess(tmp_path, dtype, preprocess):
    """Images of every integer/float type, at their extreme values, pass the checks and come out of the
    bundle's preprocessing finite and normalised; labels of any numeric type with valid values work."""
    write_toy_dataset(tmp_path, "brats2021", n=1)
    info = np.iinfo(dtype) if dtype in INT_DTYPES else None
    for i, m in enumerate(("t1", "t1ce", "t2", "flair")):
        arr = toy_modalities()[i].astype(np.float64)
        if info is not None:  # the type's whole range: min, max and everything between
            arr = np.where(toy_label() > 0, info.max, np.maximum(info.min, 0) + arr - arr.min()).astype(dtype)
            arr.flat[0] = info.min
        else:
            arr = (arr * 1e15 if dtype == "float64" else arr).astype(dtype)
        _write(tmp_path / CID / f"{CID}_{m}.nii.gz", arr)
    label_dtype = {"uint8": "int8", "int8": "uint16", "int16": "int32", "float32": "float32", "float64": "float64"}.get(dtype, dtype)
    _write(_seg(tmp_path / CID), toy_label().astype(label_dtype))
    case = list_cases(tmp_path, check="full")[0]
    out = preprocess(case)
    image = out["image"]
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    core = torch.as_tensor(depth_in_brain_mm(image) > 2.0)  # NormalizeBrainCored (brain_edge_mm 2): mean 0, std 1 over the brain's core
    for c in range(4):
        values = image[c][(image[c] != 0) & core]
        assert abs(float(values.mean())) < 1e-3 and abs(float(values.std(unbiased=False)) - 1) < 1e-2, (dtype, c)
    regions = LabelToRegionsd("label", "brats2021")(out)["label"]
    assert regions.shape[0] == 3 and int(regions[1].sum()) > 0


def test_all_zero_label_is_a_valid_case(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=1)
    _write(_seg(tmp_path / CID), np.zeros(SHAPE, np.uint8))
    assert list_cases(tmp_path, check="full")[0].label is not None


def test_malformed_msd_dataset_json(tmp_path):
    write_toy_dataset(tmp_path, "msd", n=2)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    for bad, pattern in (
        ([1, 2], "expected a JSON object"),
        ({**meta, "training": {"a": 1}}, "'training' must be a list"),
        ({**meta, "training": [{"image": 5}]}, "image must be a file path, got 5"),
        ({**meta, "test": [None]}, "test image must be a file path, got None"),
        ({**meta, "modality": {"zero": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}, "'modality' keys must be channel numbers"),
        ({**meta, "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "7": "T2w"}}, "must name channels 0, 1, 2 and 3"),
    ):
        (tmp_path / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(BraTSDataError, match=re.escape(str(tmp_path / "dataset.json")) + ".*" + pattern):
            list_cases(tmp_path)


def test_check_cli_names_case_and_file_without_traceback(tmp_path):
    write_toy_dataset(tmp_path, "brats2021", n=2)
    bad = BAD_FILES["NaN voxel"][0](tmp_path / CID)
    proc = subprocess.run([PYTHON, "-m", "custom.data", str(tmp_path)], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == f"error: case {CID}: {bad}: contains NaN or infinite voxels (1 NaN, 0 infinite)"


def test_data_error_message_is_found_through_monai_wrappers():
    try:
        try:
            raise BraTSDataError("case X: /d/x.nii.gz: all voxels are 0")
        except BraTSDataError as e:
            raise RuntimeError("applying transform <CheckedLoadImaged>") from e
    except RuntimeError as wrapped:
        assert brats.data_error_message(wrapped) == "case X: /d/x.nii.gz: all voxels are 0"
    # a DataLoader worker's error arrives as text (torch's ExceptionWrapper), chain lost
    text = "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...\ncustom.data.errors.BraTSDataError: case X: f: bad\n\nThe above exception"
    assert brats.data_error_message(RuntimeError(text)) == "case X: f: bad"
    assert brats.data_error_message(RuntimeError("unrelated")) is None


# ---------------------------------------------------------------------------------------------------------------
# property-based: single files, whole cases
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def single_files(draw):
    ndim = draw(st.sampled_from([3, 4]))
    return {
        "shape": tuple(draw(st.integers(1, 5)) for _ in range(ndim)),
        "dtype": draw(st.sampled_from(INT_DTYPES + FLOAT_DTYPES + ["complex64"])),
        "fill": draw(st.sampled_from(["normal", "normal", "zeros", "extreme", "nan", "inf"])),
        "seed": draw(st.integers(0, 2**16)),
        "angles": draw(st.tuples(*[st.floats(-180, 180)] * 3)),
        "zooms": draw(st.tuples(*[st.floats(0.3, 4.0)] * 3)),
        "defect": draw(st.sampled_from([None] * 6 + ["nan_affine", "zero_zoom", "collinear", "fov"])),
        "scaling": draw(st.sampled_from([None, None, (2.0, 0.0), (0.5, -10.0)])),
        "storage": draw(st.sampled_from(["nii.gz", "nii.gz", "nii", "raw-as-nii.gz", "gz-as-nii"])),
        "cut": draw(st.none() | st.none() | st.floats(0.0, 1.0)),
    }


def make_array(shape, dtype, fill, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    arr = rng.integers(1, 100, shape).astype(dtype)
    if fill == "zeros":
        arr = np.zeros(shape, dtype)
    elif fill == "extreme" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        arr = np.where(rng.random(shape) < 0.5, info.min, info.max).astype(dtype)
        arr.flat[0] = info.max
    elif fill == "extreme" and dtype.kind == "f":
        arr = np.full(shape, 1e300 if dtype == np.float64 else 1e30, dtype)
    elif fill in ("nan", "inf") and dtype.kind == "f":
        arr.flat[rng.integers(arr.size)] = np.nan if fill == "nan" else -np.inf
    return arr


def defective_affine(angles, zooms, defect) -> np.ndarray:
    a = oblique_affine(angles, zooms)
    if defect == "nan_affine":
        a[1, 3] = np.nan
    elif defect == "zero_zoom":
        a[:3, 0] = 0.0
    elif defect == "collinear":
        a[:3, 1] = a[:3, 0]
    elif defect == "fov":
        a[:3, 0] *= 600.0 / zooms[0]
    return a


def write_spec(path_stem: Path, raw: bytes, storage: str, cut) -> tuple[Path, int]:
    """Write NIfTI bytes as ``storage``; returns the path and how many bytes of the full body it keeps."""
    gz = storage in ("nii.gz", "gz-as-nii")
    body = gzip.compress(raw, compresslevel=1) if gz else raw
    path = Path(f"{path_stem}.nii.gz" if storage in ("nii.gz", "raw-as-nii.gz") else f"{path_stem}.nii")
    keep = len(body) if cut is None else int(cut * len(body))
    path.write_bytes(body[:keep])
    return path, len(body) - keep


@PROPERTY
@given(spec=single_files())
def test_any_single_file_loads_exactly_or_fails_clearly(tmp_path, spec):
    data = make_array(spec["shape"], spec["dtype"], spec["fill"], spec["seed"])
    scaling = spec["scaling"] if spec["dtype"] != "complex64" else None
    affine = defective_affine(spec["angles"], spec["zooms"], spec["defect"])
    raw = nifti_bytes(data, affine, *(scaling or (None,)))
    path, lost = write_spec(tmp_path / f"f{abs(hash(str(spec))) % 10**8}", raw, spec["storage"], spec["cut"])
    # what nibabel reads from the intact bytes: the oracle for the voxel checks
    intact = np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj)
    header_bad = spec["dtype"] == "complex64" or spec["defect"] is not None
    storage_bad = spec["storage"] in ("raw-as-nii.gz", "gz-as-nii")
    values_bad = intact.dtype.kind != "c" and (
        intact.min() == intact.max()  # all zero or one value everywhere: featureless
        or (intact.dtype.kind == "f" and (not np.all(np.isfinite(intact)) or np.abs(intact).max() > brats.MAX_ABS_INTENSITY))
    )
    try:
        img = load_nifti(path, "CASE")
        got = load_voxels(img, path, "CASE")
        check_image_voxels(got, f"case CASE: {path}")
    except BraTSDataError as e:
        assert str(e).startswith(f"case CASE: {path}: "), str(e)
        assert header_bad or storage_bad or values_bad or lost > 0, (spec, str(e))
        assert not storage_bad or isinstance(e, NotNiftiError), str(e)
    else:
        assert not (header_bad or storage_bad or values_bad), spec
        assert got.dtype == intact.dtype and np.array_equal(got, intact), spec  # never wrong voxels, even if bytes were cut


CASE_DEFECTS = [None, None, "shape", "affine", "ndim", "channels", "label_values", "label_shape", "label_affine", "nan", "zero"]


@st.composite
def case_specs(draw):
    return {
        "layout": draw(st.sampled_from(["brats2021", "msd"])),
        "defect": draw(st.sampled_from(CASE_DEFECTS)),
        "target": draw(st.integers(0, 3)),
        "shape": tuple(draw(st.integers(4, 9)) for _ in range(3)),
        "angles": draw(st.tuples(*[st.floats(-90, 90)] * 3)),
        "zooms": draw(st.tuples(*[st.floats(0.5, 3.0)] * 3)),
        "dtype": draw(st.sampled_from(INT_DTYPES + FLOAT_DTYPES)),
        "label_dtype": draw(st.sampled_from(["uint8", "int16", "int64", "uint64", "float32", "float64"])),
    }


def write_case(root: Path, spec: dict) -> tuple[str, Path | None]:
    """Write one case of ``spec`` (a shared oblique/anisotropic grid), then break it as ``spec['defect']``
    says; returns the case id and the broken file."""
    shape, layout, defect, target = spec["shape"], spec["layout"], spec["defect"], spec["target"]
    affine = oblique_affine(spec["angles"], spec["zooms"])
    rng = np.random.default_rng(0)
    mods = [(100 * (c + 1) + rng.integers(0, 10, shape)).astype(spec["dtype"]) for c in range(4)]
    ncr, ed, et = (CONVENTIONS["brats2021"].ncr, CONVENTIONS["brats2021"].ed, CONVENTIONS["brats2021"].et) if layout == "brats2021" else (2, 1, 3)
    label = np.zeros(shape, spec["label_dtype"])
    label[1:-1, 1:-1, 1:-1], label[2:-2, 2:-2, 2:-2], label[2, 2, 2] = ed, ncr, et
    label_affine, label_shape = affine, shape
    if defect == "nan":
        mods[target] = mods[target].astype(np.float32)
        mods[target][1, 1, 1] = np.nan
    elif defect == "zero":
        mods[target] = np.zeros(shape, mods[target].dtype)
    elif defect == "label_values":
        label[0, 0, 0] = 3 if layout == "brats2021" else 4
    elif defect == "label_shape" or (defect == "shape" and layout == "msd"):
        label_shape = (shape[0] + 1, *shape[1:])
    elif defect == "label_affine" or (defect == "affine" and layout == "msd"):
        label_affine = affine.copy()
        label_affine[:3, 3] += 2.0
    label = np.resize(label, label_shape) if label_shape != shape else label
    if layout == "brats2021":
        cid = CID
        (root / cid).mkdir(parents=True)
        paths = [root / cid / f"{cid}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")]
        for c, (path, mod) in enumerate(zip(paths, mods)):
            if c == target and defect == "shape":
                mod = np.resize(mod, (shape[0] + 1, *shape[1:]))
            if c == target and defect in ("ndim", "channels"):
                mod = np.stack([mod] * (2 if defect == "ndim" else 1), -1)
            a = affine.copy()
            if c == target and defect == "affine":
                a[:3, 3] += 2.0
            nib.save(nib.Nifti1Image(mod, a, dtype=mod.dtype), path)
        label_path = root / cid / f"{cid}_seg.nii.gz"
        nib.save(nib.Nifti1Image(label, label_affine, dtype=label.dtype), label_path)
        image_bad = paths[target]
    else:
        cid = "BRATS_001"
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        vol = np.stack([mods[k] if mods[k].dtype == mods[0].dtype else mods[k].astype(np.float32) for k in (3, 0, 1, 2)], -1)  # MSD order
        if defect == "ndim":
            vol = vol[..., 0]
        elif defect == "channels":
            vol = vol[..., :3] if target % 2 else np.concatenate([vol, vol[..., :1]], -1)
        image_bad = root / "imagesTr" / f"{cid}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine, dtype=vol.dtype), image_bad)
        label_path = root / "labelsTr" / f"{cid}.nii.gz"
        nib.save(nib.Nifti1Image(label, label_affine, dtype=label.dtype), label_path)
        meta = msd_dataset_json([{"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"}], [])
        (root / "dataset.json").write_text(json.dumps(meta))
    if defect is None:
        return cid, None
    if defect.startswith("label") or (layout == "msd" and defect in ("shape", "affine")):
        return cid, label_path
    return cid, image_bad


@PROPERTY
@given(spec=case_specs())
def test_any_case_is_listed_or_refused_naming_case_and_file(tmp_path_factory, spec):
    root = tmp_path_factory.mktemp("case")
    cid, bad = write_case(root, spec)
    # parse time (what `python -m custom.data` does)
    try:
        cases = list_cases(root, check="full")
    except BraTSDataError as e:
        assert bad is not None, (spec, str(e))
        assert str(e).startswith(f"case {cid}: ") and str(bad) in str(e), (spec, str(e))
    else:
        assert bad is None, spec
        assert [c.case_id for c in cases] == [cid]
    # load time (the bundle's loader on a datalist listed without checks)
    case = list_cases(root, check="none")[0]
    try:
        out = LabelToRegionsd("label", case.layout.convention)(LOADER(case.to_dict()))
    except BraTSDataError as e:
        assert bad is not None and str(e).startswith(f"case {cid}: ") and str(bad) in str(e), (spec, str(e))
    else:
        assert bad is None, spec
        assert out["image"].shape[0] == 4 and out["label"].shape[0] == 3


# ---------------------------------------------------------------------------------------------------------------
# oblique and anisotropic grids work: the bundle's preprocessing keeps world positions
# ---------------------------------------------------------------------------------------------------------------

SPACING = 1.5


@pytest.fixture(scope="module")
def preprocess(tmp_path_factory):
    """The bundle's deterministic preprocessing (train.json: CheckedLoadImaged, channel order,
    Orientationd RAS, Spacingd, CropForegroundd, NormalizeIntensityd) at ``SPACING`` mm, for
    BraTS 2021 layout cases."""
    root = tmp_path_factory.mktemp("layout2021")
    write_toy_dataset(root, "brats2021", n=1)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "quick.json")])
    parser["dataset_dir"] = str(root)
    parser["spacing"] = [SPACING] * 3
    pre = Compose(parser.get_parsed_content("deterministic_transforms"))
    assert isinstance(pre.transforms[0], CheckedLoadImaged)

    def run(case, inverse=False):
        out = pre(case.to_dict())
        return (out, pre.inverse(dict(out))) if inverse else out

    return run


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    zooms=st.tuples(*[st.floats(0.7, 3.0)] * 3),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
)
def test_oblique_anisotropic_case_keeps_world_positions(tmp_path_factory, preprocess, angles, zooms, flips):
    """A tumour drawn as a sphere around a known world point P: after the bundle's Orientationd +
    Spacingd (and cropping) it is still around P, the image's bright sphere too, and inverting the
    preprocessing (what inference does with its prediction) gives the input grid and label back."""
    root = tmp_path_factory.mktemp("oblique")
    (root / CID).mkdir()
    shape = tuple(int(math.ceil(36.0 / z)) for z in zooms)  # about 36 mm of field of view along each axis
    affine = oblique_affine(angles, np.multiply(zooms, flips))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    p = affine[:3, :3] @ ((np.array(shape) - 1) / 2 + 0.3) + affine[:3, 3]  # world point near the centre, off the voxel grid
    dist = np.linalg.norm(world - p, axis=-1)
    label = np.where(dist < 9.0, 2, 0).astype(np.uint8)
    label[dist < 5.0] = 4
    # a background of 100 plus noise: a constant non-zero background would be set to 0 (ZeroBackgroundd)
    image = (100 + 900 * (dist < 9.0) + np.random.default_rng(0).integers(0, 20, shape)).astype(np.int16)
    for m in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(image, affine), root / CID / f"{CID}_{m}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / CID / f"{CID}_seg.nii.gz")
    case = list_cases(root, check="full")[0]  # oblique/anisotropic grids are accepted
    out, back = preprocess(case, inverse=True)

    before = world_centroid(label > 0, affine)
    assert np.linalg.norm(before - p) < 0.5 * max(zooms)  # the drawn sphere is around P
    tol = 0.5 * max(max(zooms), SPACING)  # nearest-neighbour resampling moves a boundary by up to half a voxel
    out_affine = out["label"].affine.numpy()
    assert np.allclose(np.sqrt((out_affine[:3, :3] ** 2).sum(0)), SPACING, atol=1e-4)  # resampled to the bundle's spacing
    for mask in (out["label"][0].numpy() > 0, out["label"][0].numpy() == 4):
        assert mask.any()
    assert np.linalg.norm(world_centroid(out["label"][0].numpy() > 0, out_affine) - before) < tol
    assert np.linalg.norm(world_centroid(out["label"][0].numpy() == 4, out_affine) - world_centroid(label == 4, affine)) < tol
    img = out["image"][0].numpy()
    assert np.linalg.norm(world_centroid(img > img.min() + 0.5 * (img.max() - img.min()), out["image"].affine.numpy()) - before) < tol
    # inverse: back on the input grid (shape and affine), the same tumour
    lab_back = back["label"][0].numpy()
    assert lab_back.shape == shape and np.allclose(back["label"].affine.numpy(), affine, atol=1e-4)
    wt_back, wt = lab_back > 0, label > 0
    assert 2 * (wt_back & wt).sum() / (wt_back.sum() + wt.sum()) > 0.9
    assert np.linalg.norm(world_centroid(wt_back, affine) - before) < tol


# ---------------------------------------------------------------------------------------------------------------
# MONAI Label uploads: labels (check_label_file) and images (add_image)
# ---------------------------------------------------------------------------------------------------------------

IMAGE_SHAPE = (8, 7, 6)
IMAGE_AFFINE = oblique_affine((20.0, -35.0, 10.0), (0.9, 1.2, 3.0))  # the image grid labels must match: oblique, anisotropic
WHERE = "label for image 'IMG'"


@st.composite
def label_uploads(draw):
    return {
        "dtype": draw(st.sampled_from(INT_DTYPES + FLOAT_DTYPES + ["complex64"])),
        "values": draw(st.sampled_from(["valid", "valid", "valid", "huge", "fraction", "nan", "negative", "empty"])),
        "shape": draw(st.sampled_from(["match", "match", "match", "other", "4d1", "4d2"])),
        "grid": draw(st.sampled_from(["match", "match", "match", "rotated", "shifted", "nan"])),
        "storage": draw(st.sampled_from(["nii.gz", "nii.gz", "nii", "raw-as-nii.gz", "gz-as-nii"])),
        "cut": draw(st.none() | st.none() | st.floats(0.0, 1.0)),
    }


@PROPERTY
@given(spec=label_uploads())
def test_label_upload_is_stored_or_refused_with_415_or_422(tmp_path, spec):
    dtype = np.dtype(spec["dtype"])
    label = np.zeros(IMAGE_SHAPE, dtype)
    label[2:6, 2:5, 1:4], label[3, 3, 2] = 2, 4
    bad_values = spec["values"] not in ("valid", "empty")
    if spec["values"] == "huge":
        label[0, 0, 0] = 2**40 + 1 if dtype.itemsize == 8 and dtype.kind in "iu" else (np.iinfo(dtype).max if dtype.kind in "iu" else 1e30)
    elif spec["values"] == "fraction":
        bad_values = dtype.kind != "iu" and dtype.kind in "fc"
        label[0, 0, 0] = 1.5 if bad_values else 1
    elif spec["values"] == "nan":
        bad_values = dtype.kind in "fc"
        label[0, 0, 0] = np.nan if bad_values else 0
    elif spec["values"] == "negative":
        bad_values = dtype.kind in "if"
        label[0, 0, 0] = -1 if bad_values else 0
    elif spec["values"] == "empty":
        label[:] = 0  # an all-background label is a valid annotation
    if spec["shape"] == "other":
        label = np.resize(label, (IMAGE_SHAPE[0], IMAGE_SHAPE[1] + 1, IMAGE_SHAPE[2]))
    elif spec["shape"] in ("4d1", "4d2"):
        label = np.stack([label] * (1 if spec["shape"] == "4d1" else 2), -1)
    affine = IMAGE_AFFINE.copy()
    if spec["grid"] == "rotated":
        affine[:3, :3] = rotation((0.0, 0.0, 5.0)) @ affine[:3, :3]
    elif spec["grid"] == "shifted":
        affine[:3, 3] += 1.0
    elif spec["grid"] == "nan":
        affine[0, 0] = np.nan
    path, lost = write_spec(tmp_path / "upload", nifti_bytes(label, affine), spec["storage"], spec["cut"])
    storage_bad = spec["storage"] in ("raw-as-nii.gz", "gz-as-nii")
    must_fail = storage_bad or bad_values or dtype.kind == "c" or spec["shape"] in ("other", "4d2") or spec["grid"] != "match"
    try:
        check_label_file(str(path), IMAGE_SHAPE, IMAGE_AFFINE, CONVENTIONS["brats2021"], WHERE)
    except HTTPException as e:
        assert e.status_code in (415, 422) and WHERE in e.detail and str(tmp_path) not in e.detail, (spec, e.status_code, e.detail)
        assert must_fail or lost > 0, (spec, e.detail)
        assert not storage_bad or e.status_code == 415, (spec, e.detail)
    else:
        assert not must_fail, spec


def test_uploads_declaring_absurd_sizes_are_refused_before_reading(tmp_path, image_store):
    huge = _put(tmp_path / "huge.nii.gz", gzip.compress(nifti_bytes(np.zeros(8, np.uint8), IMAGE_AFFINE, shape=(30000, 30000, 30000, 4))))
    tracemalloc.start()
    with pytest.raises(HTTPException) as label_err:
        check_label_file(str(huge), IMAGE_SHAPE, IMAGE_AFFINE, CONVENTIONS["brats2021"], WHERE)
    with pytest.raises(HTTPException) as image_err:
        image_store.add_image("huge", str(huge), {})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * 2**20, peak
    for err, who in ((label_err, WHERE), (image_err, "image 'huge'")):
        assert err.value.status_code == 422 and err.value.detail.startswith(f"{who}: the header declares (30000, 30000, 30000, 4) voxels of uint8")


def test_case_the_server_cannot_name_is_not_listed_and_training_goes_on(tmp_path):
    """A case folder with a space is listed by the data layer (the bundle uses it) but not served:
    the datastore lists, and trains on, the cases it can serve."""
    write_toy_dataset(tmp_path, "brats2021", n=3)
    odd = tmp_path / "BraTS2021 00002"
    (tmp_path / "BraTS2021_00002").rename(odd)
    for f in odd.iterdir():
        f.rename(odd / f.name.replace("BraTS2021_00002", "BraTS2021 00002"))
    assert [c.case_id for c in list_cases(tmp_path)] == ["BraTS2021 00002", "BraTS2021_00000", "BraTS2021_00001"]
    store, layout = open_datastore(str(tmp_path))
    assert layout.name == "brats2021" and sorted(store.list_images()) == ["BraTS2021_00000", "BraTS2021_00001"]
    assert [Path(d["label"]).name for d in store.datalist()] == ["BraTS2021_00000_seg.nii.gz", "BraTS2021_00001_seg.nii.gz"]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    return CheckedLocalDatastore(str(tmp_path_factory.mktemp("studies")), CONVENTIONS["msd"])


@st.composite
def image_uploads(draw):
    return {
        "channels": draw(st.sampled_from([4, 4, 4, 4, 3, 5, None])),  # None: a 3D image
        "dtype": draw(st.sampled_from(INT_DTYPES + FLOAT_DTYPES)),
        "fill": draw(st.sampled_from(["normal", "normal", "normal", "zeros", "extreme", "nan", "inf"])),
        "channel": draw(st.integers(0, 3)),
        "angles": draw(st.tuples(*[st.floats(-180, 180)] * 3)),
        "zooms": draw(st.tuples(*[st.floats(0.3, 4.0)] * 3)),
        "defect": draw(st.sampled_from([None] * 6 + ["nan_affine", "zero_zoom", "collinear", "fov"])),
        "storage": draw(st.sampled_from(["nii.gz", "nii.gz", "nii", "raw-as-nii.gz", "gz-as-nii"])),
        "cut": draw(st.none() | st.none() | st.floats(0.0, 1.0)),
    }


_upload_ids = itertools.count()


@PROPERTY
@given(spec=image_uploads())
def test_image_upload_is_added_or_refused_with_415_or_422(tmp_path, image_store, spec):
    shape = (5, 4, 3)
    channels = [make_array(shape, spec["dtype"], "normal", c) for c in range(spec["channels"] or 1)]
    c = spec["channel"] % len(channels)
    channels[c] = make_array(shape, spec["dtype"], spec["fill"], c)  # one channel filled as drawn
    vol = np.stack(channels, -1) if spec["channels"] else channels[0]
    affine = defective_affine(spec["angles"], spec["zooms"], spec["defect"])
    path, lost = write_spec(tmp_path / "upload", nifti_bytes(vol, affine), spec["storage"], spec["cut"])
    storage_bad = spec["storage"] in ("raw-as-nii.gz", "gz-as-nii")
    ch = channels[c]
    values_bad = not np.any(ch) or (ch.dtype.kind == "f" and (not np.all(np.isfinite(ch)) or np.abs(ch).max() > brats.MAX_ABS_INTENSITY))
    must_fail = storage_bad or spec["channels"] != 4 or spec["defect"] is not None or values_bad
    image_id = f"img{next(_upload_ids)}"
    try:
        assert image_store.add_image(image_id, str(path), {}) == image_id
    except HTTPException as e:
        assert e.status_code in (415, 422) and f"image {image_id!r}" in e.detail and str(tmp_path) not in e.detail, (spec, e.detail)
        assert must_fail or lost > 0, (spec, e.detail)
        assert not storage_bad or e.status_code == 415, (spec, e.detail)
        assert image_id not in image_store._datastore.objects
    else:
        assert not must_fail, spec
        assert image_id in image_store._datastore.objects


# ---------------------------------------------------------------------------------------------------------------
# bundle commands stop with the data layer's message as stderr's last line
# ---------------------------------------------------------------------------------------------------------------

TINY = ["--spacing", "[5.0,5.0,5.0]", "--roi_size", "[64,32,32]", "--feature_size", "12", "--depths", "[1,1,1,1]",
        "--num_samples", "1", "--warmup_epochs", "1", "--num_folds", "3", "--use_crf", "false"]


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


@pytest.fixture(scope="module")
def bundle_runs(tmp_path_factory):
    """Three bad datasets run through the bundle's commands at once (subprocesses, tiny settings);
    returns ``name -> (process, case id, bad file)``."""
    root = tmp_path_factory.mktemp("bundle_bad")
    runs = {}

    def dataset(name, n, corrupt, case=0, unlabelled=0):
        d = root / name
        write_toy_dataset(d, "brats2021", n=n, unlabelled=unlabelled)
        cid = f"BraTS2021_{case:05d}"
        return d, cid, corrupt(d / cid, cid)

    # parse time: a truncated file, found by the header check that builds the datalist
    d, cid, bad = dataset("truncated", 2, lambda c, i: _put(c / f"{i}_flair.nii.gz", gzip.compress(nifti_bytes(_noise()))[:900]), case=1)
    runs["evaluating, truncated file (parse time)"] = (
        ["evaluating", "--config_file", _configs("train.json", "quick.json", "evaluate.json"), "--num_workers", "0"], d, cid, bad,
        "truncated or corrupt NIfTI data")
    # load time, CacheDataset (training and validation sets are cached before the first epoch)
    d, cid, bad = dataset("nan", 3, lambda c, i: _write(c / f"{i}_t1ce.nii.gz", _t2_with(np.nan)), case=2)
    runs["training, NaN voxel (load time)"] = (["training", "--config_file", _configs("train.json", "quick.json"), "--epochs", "1", "--num_workers", "0"], d, cid, bad,
                                               "contains NaN or infinite voxels (1 NaN, 0 infinite)")
    # batch inference: two bad cases among four (an all-zero image, a decompression bomb); the others are written
    d, cid, bad = dataset("batch", 4, lambda c, i: _write(c / f"{i}_t2.nii.gz", np.zeros(SHAPE, np.int16)), case=1, unlabelled=4)
    bomb = _bomb(d / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz", "padding")
    runs["inference, two bad cases among four (batch summary)"] = (
        ["inference", "--config_file", _configs("inference.json", "quick.json"), "--num_workers", "1"], d, cid, [bad, bomb], "")
    # output folder that cannot be made (its parent is a file); a write that fails (file size limit: a full disk)
    d, _, _ = dataset("good", 1, lambda c, i: None, unlabelled=1)
    (root / "a_file").write_text("not a folder")
    runs["inference, output folder cannot be made"] = (
        ["inference", "--config_file", _configs("inference.json", "quick.json"), "--output_dir", str(root / "a_file" / "out")], d, None, None, "")
    runs["inference, disk full while writing"] = (
        ["inference", "--config_file", _configs("inference.json", "quick.json"), "--num_workers", "0"], d, None, None, "fsize")
    bundle_root = root / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "quick.json")])
    parser.update({"feature_size": 12, "depths": [1, 1, 1, 1]})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle_root / "models" / "model.pt")  # an untrained tiny model

    env = run_env()
    env["OMP_NUM_THREADS"] = "1"
    procs = {}
    for name, (args, d, cid, bad, expected) in runs.items():
        out_dir = root / "out" / str(len(procs))
        own_out = [] if "--output_dir" in args else ["--output_dir", str(out_dir)]
        cmd = [PYTHON, "-m", "monai.bundle", "run", *args, *own_out, "--dataset_dir", str(d), "--bundle_root", str(bundle_root), *TINY]
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))) if expected == "fsize" else None  # files > 64 bytes fail
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=limit), cid, bad, expected, out_dir)
    results = {}
    for name, (proc, cid, bad, expected, out_dir) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err, cid, bad, expected, out_dir)
    return results


@pytest.mark.parametrize("name", ["evaluating, truncated file (parse time)", "training, NaN voxel (load time)"])
def test_bundle_command_ends_with_the_data_error(bundle_runs, name):
    code, out, err, cid, bad, expected, _ = bundle_runs[name]
    assert code != 0, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"BraTSDataError: case {cid}: {bad}"), err[-3000:]
    assert expected in last, last


def test_batch_inference_writes_every_good_case_then_names_the_bad_ones(bundle_runs):
    code, out, err, cid, (zero, bomb), _, out_dir = bundle_runs["inference, two bad cases among four (batch summary)"]
    assert code != 0, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"BraTSDataError: 2 of 4 cases not segmented (2 written to {out_dir}): case {cid}: {zero}: "), last
    assert "all voxels are 0" in last and f"case BraTS2021_00002: {bomb}: the compressed stream holds more than" in last, last
    assert sorted(p.name for p in out_dir.iterdir()) == ["BraTS2021_00000.nii.gz", "BraTS2021_00003.nii.gz"]
    for p in out_dir.iterdir():
        assert np.asarray(nib.load(p).dataobj).shape == SHAPE


def test_unwritable_output_fails_naming_the_path_and_leaves_no_partial_file(bundle_runs):
    code, out, err, *_ = bundle_runs["inference, output folder cannot be made"]
    assert code != 0 and err.strip().splitlines()[-1].startswith("OutputError: output folder "), err[-3000:]
    assert "a_file/out: not writable (" in err.strip().splitlines()[-1], err[-3000:]
    code, out, err, _, _, _, out_dir = bundle_runs["inference, disk full while writing"]
    last = err.strip().splitlines()[-1]
    assert code != 0 and last.startswith(f"OutputError: {out_dir / 'BraTS2021_00000.nii.gz'}: cannot be written (OSError: File too large)"), err[-3000:]
    assert list(out_dir.iterdir()) == []  # neither the result's name nor a temporary file
