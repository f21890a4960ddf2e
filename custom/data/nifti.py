"""Hardened NIfTI reading: every file is checked before its voxels are read.

:func:`load_nifti` accepts a readable NIfTI-1/2 file, gzip-compressed exactly when named
``.nii.gz``; :func:`check_header` a supported voxel type, at most ``MAX_IMAGE_BYTES`` of voxels and
``MAX_FOV_MM`` of field of view per axis, a finite non-degenerate affine, a file long enough for
what its header declares and no more than ``MAX_HEADER_BYTES`` around the voxels (decompression
bombs are refused before they are expanded). :func:`load_voxels` streams the voxels;
:func:`check_image_voxels` refuses NaN/infinite, constant and overflow-prone (beyond
``MAX_ABS_INTENSITY``) images. Errors are :class:`custom.data.errors.BraTSDataError` naming the case
and the file. Oblique and anisotropic affines are accepted: the bundle resamples them.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import nibabel as nib
import numpy as np

from custom.data.errors import BraTSDataError, NotNiftiError

MAX_IMAGE_BYTES = int(os.environ.get("BRATS_MAX_IMAGE_BYTES", 2**30))
"""Largest voxel array (header dimensions x voxel type size) a file may declare: 1 GiB by default
(a BraTS modality is 240 x 240 x 155 int16 = 18 MB, an MSD 4D float32 image 143 MB)."""
MAX_FOV_MM = float(os.environ.get("BRATS_MAX_FOV_MM", 500.0))
"""Largest field of view (voxels x voxel size) along any voxel axis: a head is about 250 mm; more
is another body part or a header with wrong voxel sizes/units (and would resample to a huge grid)."""
MAX_HEADER_BYTES = int(os.environ.get("BRATS_MAX_HEADER_BYTES", 2**24))
"""Largest header + extensions (the voxels' start, ``vox_offset``) and largest data after the voxels
that a file may hold: 16 MiB by default. More is a decompression bomb (a 0.4 MB ``.nii.gz`` can
expand to gigabytes of padding or extra gzip members), refused before it is expanded."""
MIN_VOXEL_MM = 0.01
"""Smallest voxel size accepted (10 micrometres); smaller ones are a degenerate affine."""
MAX_ABS_INTENSITY = 1e20
"""Largest image intensity magnitude: float32 statistics (MONAI's NormalizeIntensity mean) overflow
near 1e31 for a BraTS volume; MRI intensities are at most ~1e5."""
SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")


def _who(case_id: str | None) -> str:
    return f"case {case_id}: " if case_id else ""


def _looks_like_nifti(head: bytes) -> bool:
    """The first bytes of an uncompressed NIfTI-1 or NIfTI-2 header (``sizeof_hdr`` 348 or 540)."""
    return len(head) >= 4 and head[:4] in {n.to_bytes(4, order) for n in (348, 540) for order in ("little", "big")}


def load_nifti(path: str | os.PathLike, case_id: str | None = None, name: str | None = None, check: bool = True) -> nib.Nifti1Image:
    """``nibabel.load`` with errors that name the case and the file; reads the header only.

    ``name`` replaces the path in messages (an uploaded file's temporary path means nothing to the
    client). With ``check`` (default) the header is checked with :func:`check_header`. Raises
    :class:`NotNiftiError` for a file that is not a readable NIfTI file, ``BraTSDataError`` for
    the rest.
    """
    p = os.fspath(path)
    where = f"{_who(case_id)}{name or p}"
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(4)
    except FileNotFoundError as e:
        raise BraTSDataError(f"{where}: file not found") from e
    except OSError as e:
        raise BraTSDataError(f"{where}: cannot be read ({type(e).__name__}: {e.strerror or e})") from e
    if size == 0:
        raise NotNiftiError(f"{where}: not a readable NIfTI file (the file is empty)")
    gzipped = head[:2] == b"\x1f\x8b"
    if p.endswith(".gz") and not gzipped:
        hint = "it is an uncompressed NIfTI file: rename it to .nii" if _looks_like_nifti(head) else f"it starts with {head!r}"
        raise NotNiftiError(f"{where}: not a readable NIfTI file (named .gz but not gzip-compressed; {hint})")
    if p.endswith(".nii") and gzipped:
        raise NotNiftiError(f"{where}: not a readable NIfTI file (gzip-compressed but named .nii: rename it to .nii.gz)")
    _check_voxel_offset(p, gzipped, where)
    try:
        img = nib.load(p)
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, OSError, EOFError, zlib/gzip errors...
        raise NotNiftiError(f"{where}: not a readable NIfTI file ({type(e).__name__}: {str(e).replace(p, name or p)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NotNiftiError(f"{where}: not a readable NIfTI file (a {type(img).__name__})")
    if check:
        check_header(img, p, case_id, name)
    return img


def _check_voxel_offset(path: str, gzipped: bool, where: str) -> None:
    """Refuse a header whose voxels start beyond :data:`MAX_HEADER_BYTES` (``vox_offset``), or whose
    extensions nibabel would read to the end of the stream (extensions flagged, ``vox_offset`` inside
    the header). Reads the first 544 bytes only; anything that is not a NIfTI header is left to nibabel."""
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(544)
    except (EOFError, OSError, zlib.error):
        return  # nibabel names what is wrong
    for order in "<>":
        if len(head) >= 4 and int(np.frombuffer(head[:4], order + "i4")[0]) in (348, 540):
            break
    else:
        return
    nifti2 = int(np.frombuffer(head[:4], order + "i4")[0]) == 540
    hdr_size = 540 if nifti2 else 348
    if len(head) < hdr_size + 4:
        return
    offset = float(np.frombuffer(head[168:176], order + "i8")[0] if nifti2 else np.frombuffer(head[108:112], order + "f4")[0])
    if not math.isfinite(offset) or offset > MAX_HEADER_BYTES:
        raise BraTSDataError(
            f"{where}: the header puts the voxels at byte {offset:.0f} (vox_offset), beyond the "
            f"{MAX_HEADER_BYTES / 2**20:.3g} MiB allowed for header and extensions (BRATS_MAX_HEADER_BYTES); not read"
        )
    if head[hdr_size] != 0 and offset < hdr_size + 4:
        raise BraTSDataError(
            f"{where}: the header flags extensions but puts the voxels at byte {offset:.0f} (vox_offset), inside the "
            f"header: the extensions have no end; not read"
        )


def check_header(img: nib.Nifti1Image, path: str | os.PathLike, case_id: str | None = None, name: str | None = None) -> None:
    """Refuse (``BraTSDataError``) a header no voxel should be read for.

    Checks, without reading voxels: no empty dimension; a supported voxel type
    (:data:`SUPPORTED_DTYPES`: no complex, RGB or 128-bit types); at most :data:`MAX_IMAGE_BYTES`
    of voxels; a finite affine with voxel sizes >= :data:`MIN_VOXEL_MM`, non-collinear axes and a
    field of view <= :data:`MAX_FOV_MM` per axis; a file at least as long as the header says (for
    ``.nii.gz`` the gzip trailer's size field, then a streamed count if that disagrees).
    """
    p = os.fspath(path)
    where = f"{_who(case_id)}{name or p}"
    shape = tuple(int(s) for s in img.shape)
    if not shape or min(shape) < 1:
        raise BraTSDataError(f"{where}: the header declares an empty image (shape {shape})")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.newbyteorder("=").name not in SUPPORTED_DTYPES:
        raise BraTSDataError(f"{where}: voxel type {dtype} is not supported (expected one of {', '.join(SUPPORTED_DTYPES)})")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_IMAGE_BYTES:
        raise BraTSDataError(
            f"{where}: the header declares {shape} voxels of {dtype} = {nbytes / 2**30:.3g} GiB, more than the "
            f"{MAX_IMAGE_BYTES / 2**30:.3g} GiB limit (BRATS_MAX_IMAGE_BYTES); not read"
        )
    affine = np.asarray(img.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise BraTSDataError(f"{where}: the voxel-to-world affine has NaN or infinite values:\n{np.array2string(affine, precision=3)}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if zooms.min() < MIN_VOXEL_MM or abs(np.linalg.det(affine[:3, :3])) < 1e-3 * float(np.prod(zooms)):
        raise BraTSDataError(
            f"{where}: degenerate voxel-to-world affine (voxel sizes {np.array2string(zooms, precision=4)} mm; zero, "
            f"below {MIN_VOXEL_MM} mm or collinear axes):\n{np.array2string(affine, precision=4)}"
        )
    fov = np.asarray(shape[:3], float) * zooms[: len(shape[:3])]
    if fov.max() > MAX_FOV_MM:
        raise BraTSDataError(
            f"{where}: field of view {np.array2string(fov, precision=1)} mm exceeds {MAX_FOV_MM:g} mm (BRATS_MAX_FOV_MM): not a head "
            f"scan, or wrong voxel sizes/units in the header (voxel sizes {np.array2string(zooms, precision=4)} mm)"
        )
    _check_file_length(p, img, nbytes, where)


def _check_file_length(path: str, img: nib.Nifti1Image, nbytes: int, where: str) -> None:
    """``BraTSDataError`` when ``path`` holds fewer bytes than header + voxels (a truncated file)."""
    offset = getattr(img.dataobj, "offset", None)  # where nibabel reads the voxels (the loaded header's vox_offset is reset to 0)
    need = int(offset if offset is not None else img.header.get_data_offset()) + nbytes
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            have = os.fstat(f.fileno()).st_size
            if have < need:
                raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data (the file has {have} bytes, its header declares {need})")
            return
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == need % 2**32:
            return  # the gzip trailer's uncompressed size (mod 2**32) is what the header declares
    # trailer disagrees: truncated, or several gzip members / trailing bytes; count what decompresses,
    # up to MAX_HEADER_BYTES past the voxels (a decompression bomb is not expanded further)
    have, most = 0, need + MAX_HEADER_BYTES + 1
    try:
        with gzip.open(path, "rb") as g:
            while have < most:
                chunk = g.read(min(1 << 22, most - have))
                if not chunk:
                    break
                have += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        if have >= need:
            return  # the voxels are all there; load_voxels names a corrupt tail when it reads them
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data ({type(e).__name__}: {e}; {have} of {need} bytes readable)") from e
    if have < need:
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data (it decompresses to {have} bytes, its header declares {need})")
    if have == most:
        raise BraTSDataError(_bomb_message(where))


def _bomb_message(where: str) -> str:
    return (f"{where}: the compressed stream holds more than {MAX_HEADER_BYTES / 2**20:.3g} MiB after the voxels its header "
            f"declares (padding or extra gzip members; BRATS_MAX_HEADER_BYTES); not read further")


def load_voxels(img: nib.Nifti1Image, path: str, case_id: str | None = None, name: str | None = None) -> np.ndarray:
    """The voxel array of ``img`` (loaded from ``path``); a truncated or corrupt file raises ``BraTSDataError``.

    A gzip-compressed file is decompressed to its end with its CRC checked (nibabel stops reading
    before the gzip trailer, so a flipped bit in the compressed stream would otherwise give wrong
    voxels silently), into one buffer of header + voxels: a stream holding more than
    :data:`MAX_HEADER_BYTES` after the voxels (padding, extra gzip members) is refused, not expanded.
    Peak memory: the declared header + voxels, plus the array when the header scales intensities."""
    p = os.fspath(path)
    where = f"{_who(case_id)}{name or p}"
    try:
        with open(p, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            return np.asanyarray(img.dataobj)
        proxy = img.dataobj
        shape, dtype, offset = tuple(int(n) for n in proxy.shape), proxy.dtype, int(proxy.offset)
        buf = bytearray(offset + math.prod(shape) * dtype.itemsize)
        view, got = memoryview(buf), 0
        with gzip.open(p, "rb") as g:
            while got < len(buf):
                n = g.readinto(view[got:])
                if not n:
                    break
                got += n
            extra = len(g.read(MAX_HEADER_BYTES + 1)) if got == len(buf) else 0  # reads to the trailer: checks the CRC
    except Exception as e:  # EOFError, zlib.error, BadGzipFile (CRC), OSError, ValueError from a short read
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data ({type(e).__name__}: {e})") from e
    if got < len(buf):
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data (it decompresses to {got} bytes, its header declares {len(buf)})")
    if extra > MAX_HEADER_BYTES:
        raise BraTSDataError(_bomb_message(where))
    raw = np.frombuffer(buf, dtype, math.prod(shape), offset).reshape(shape, order="F")
    return nib.volumeutils.apply_read_scaling(raw, np.asanyarray(proxy.slope), np.asanyarray(proxy.inter))


def check_image_voxels(data, where: str) -> None:
    """Refuse (``BraTSDataError``) image voxels that are NaN/infinite, all zero or all one value, or beyond
    :data:`MAX_ABS_INTENSITY` (they overflow float32 statistics). ``data``: a numpy array or tensor.

    Two reductions (min and max, which NaN propagates through) and no temporary array: about 10 ms
    for a 240 x 240 x 155 float32 volume.
    """
    data = np.asarray(data.detach().cpu() if hasattr(data, "detach") else data)
    lo, hi = float(data.min()), float(data.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_nan = int(np.isnan(data).sum()) if data.dtype.kind == "f" else 0
        n_inf = int(np.isinf(data).sum()) if data.dtype.kind == "f" else 0
        raise BraTSDataError(f"{where}: contains NaN or infinite voxels ({n_nan} NaN, {n_inf} infinite)")
    if max(-lo, hi) > MAX_ABS_INTENSITY:
        raise BraTSDataError(f"{where}: intensities up to {max(-lo, hi):.3g} exceed {MAX_ABS_INTENSITY:g} (overflow-prone; MRI intensities are at most ~1e5)")
    if lo == hi:  # nothing to segment: blank, or one value everywhere
        what = "all voxels are 0 (an empty or blank image)" if lo == 0 else f"all voxels equal {lo:g} (a constant, featureless image)"
        raise BraTSDataError(f"{where}: {what}")
