"""The model grid on the reference series' voxel lattice, and labels carried between grids label by label.

A reference whose axes are parallel to the model grid's is resampled without interpolation and its labels go
back exactly; on a rotated grid a label map is carried by interpolating each label (no half-voxel shifts).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from custom.preparation import map_to_reference, output_name, prepare_study
from custom.preparation.grid import lattice_rotation, model_grid
from custom.preparation.mapping import resample_labels
from custom.synthetic import write_dataset
from custom.synthetic.fields import rotation

SEED = 5


def oblique_affine(angles_deg, spacing, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rotation(angles_deg) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def test_lattice_rotation_follows_the_series_axes():
    # a sagittal series (voxel axes A, S, R), tilted 8 degrees: the grid's axes are its own, each along L, P or S
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    aff = np.eye(4)
    aff[:3, :3] = rotation([8.0, 0.0, 0.0]) @ sagittal @ np.diag([0.9, 0.9, 1.2])
    r = lattice_rotation(aff)
    grid = model_grid(np.random.default_rng(0).uniform(-60, 60, (500, 3)), 1.0, r)
    to_lattice = np.linalg.inv(aff[:3, :3]) @ grid.affine[:3, :3]
    assert np.allclose(np.abs(to_lattice) > 1e-6, sagittal.T > 0)  # each grid axis along one series axis
    assert np.allclose(np.diag(np.sign(grid.affine[:3, :3])), [-1, -1, 1])  # still pointing to L, P, S
    sheared = aff.copy()
    sheared[:3, 2] += 0.2 * aff[:3, 0]
    assert lattice_rotation(sheared) is None


def test_model_grid_snaps_onto_a_parallel_lattice_only():
    points = np.random.default_rng(1).uniform(-70, 70, (800, 3)) + [0.3, -0.7, 0.45]
    lattice = oblique_affine([0, 0, 0], [1.0, 1.0, 1.0], [-120.37, -110.81, -60.5])
    free = model_grid(points, 1.0)
    snapped = model_grid(points, 1.0, lattice=lattice)
    offset = (np.linalg.inv(lattice) @ snapped.affine)[:3, 3]
    assert np.allclose(offset, np.rint(offset), atol=1e-6)
    assert not np.allclose((np.linalg.inv(lattice) @ free.affine)[:3, 3] % 1, 0, atol=0.05)
    assert np.abs(snapped.affine[:3, 3] - free.affine[:3, 3]).max() <= 0.5 + 1e-9
    tilted = oblique_affine([5, 0, 0], [1.0, 1.0, 1.0], lattice[:3, 3])
    assert np.allclose(model_grid(points, 1.0, lattice=tilted).affine, free.affine)  # not parallel: left as it was


def nested_ball(coords: np.ndarray, centre) -> np.ndarray:
    """BraTS-like nested labels at voxel coordinates ``coords`` (..., 3): 2 (oedema) out to 14 voxels from
    ``centre``, 1 (core) out to 9, in it a 1.5-voxel shell of 4 (enhancing) from 7 to 8.5."""
    d = np.linalg.norm(coords - np.asarray(centre), axis=-1)
    return np.select([d <= 7.0, d <= 8.5, d <= 9.0, d <= 14.0], [1, 4, 1, 2], 0).astype(np.uint8)


def test_resample_labels_on_a_shared_lattice_copies():
    label = nested_ball(np.indices((40, 40, 40)).transpose(1, 2, 3, 0), [19.5, 19.5, 19.5])
    # target voxel (i, j, k) -> source voxel (39 - k, i + 3, j): flipped, permuted, shifted
    m = np.array([[0, 0, -1, 39], [1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    i, j, k = np.indices((36, 40, 40))
    assert np.array_equal(resample_labels(label, m, (36, 40, 40)), label[39 - k, i + 3, j])


def test_resample_labels_follows_thin_labels_closer_than_nearest_neighbour():
    """A label map sampled on one grid, carried onto a grid rotated by about 10 degrees and moved by a fraction of a
    voxel, against the same labels sampled on that grid directly."""
    rng = np.random.default_rng(0)
    shape, centre = (40, 40, 40), np.array([19.7, 19.2, 19.4])
    voxels = np.indices(shape).transpose(1, 2, 3, 0).astype(float)
    source = nested_ball(voxels, centre)
    gain = []
    for _ in range(3):
        r = rotation(rng.uniform(-12.0, 12.0, 3))
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = r, centre - r @ centre + rng.uniform(-0.5, 0.5, 3)  # target voxel -> source voxel
        truth = nested_ball(voxels @ m[:3, :3].T + m[:3, 3], centre)
        by_label = resample_labels(source, m, shape)
        by_nearest = ndi.affine_transform(source, m[:3, :3], m[:3, 3], shape, order=0)
        assert set(np.unique(by_label)) == {0, 1, 2, 4}
        for values in ([4], [1, 4], [1, 2, 4]):  # ET, TC, WT
            t = np.isin(truth, values)
            dice = {k: 2 * (np.isin(v, values) & t).sum() / (np.isin(v, values).sum() + t.sum()) for k, v in (("label", by_label), ("nearest", by_nearest))}
            assert dice["label"] > 0.85, (values, dice)
            gain.append(dice["label"] - dice["nearest"])
    assert min(gain) > -0.005 and np.mean(gain[::3]) > 0.02  # the thin shell gains most


def test_a_skull_stripped_reference_is_copied_and_its_label_goes_back_exactly(tmp_path):
    """A BraTS-ready case (2.5 mm, voxel axes L, P, S) stored as a sagittal series: prepared on a 2.5 mm grid, the
    reference's values are copied, not interpolated, and a label on the prepared grid comes back voxel for voxel."""
    write_dataset(tmp_path / "ready", 1, seed=SEED, layout="brats2021", size="small")
    case = tmp_path / "ready" / "BraTS2021_00000"
    series = {}
    for s in ("t1ce", "flair"):
        img = nib.load(case / f"BraTS2021_00000_{s}.nii.gz")
        data = np.transpose(np.asarray(img.dataobj), (1, 2, 0))  # voxel axes P, S, L: sagittal
        aff = img.affine @ np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
        aff[:3, 3] += [0.3, 0.3, 0.3] if s == "flair" else 0.0
        series[s] = tmp_path / f"{s}_sagittal.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), series[s])
    rep = prepare_study(series, tmp_path / "out", case_id="C", spacing=2.5, bias_correction=False)
    assert rep["brain"]["method"] == "skull-stripped"
    grid_aff = np.array(rep["grid"]["affine_ras"])
    ref = nib.load(series["t1ce"])
    to_ref = np.linalg.inv(ref.affine) @ grid_aff  # prepared voxel -> reference voxel: a signed permutation, integers
    assert np.allclose(to_ref, np.rint(to_ref), atol=1e-4)
    prepared = np.asarray(nib.load(tmp_path / "out" / output_name("C", "t1ce")).dataobj)
    idx = np.rint(np.indices(prepared.shape).reshape(3, -1).T @ to_ref[:3, :3].T + to_ref[:3, 3]).astype(int)
    inside = np.all((idx >= 0) & (idx < ref.shape), axis=1) & (prepared.reshape(-1) != 0)
    source = np.asarray(ref.dataobj, np.float32)[tuple(idx[inside].T)]
    assert inside.sum() > 1000 and np.allclose(prepared.reshape(-1)[inside], source, rtol=1e-5, atol=1e-3)
    label = np.zeros(prepared.shape, np.uint8)
    label[prepared > np.percentile(prepared[prepared != 0], 90)] = 4
    label[20:24, 30:31, 10:40] = 1  # a one-voxel-thin plate
    nib.save(nib.Nifti1Image(label, grid_aff), tmp_path / "label.nii.gz")
    back = np.asarray(nib.load(map_to_reference(tmp_path / "label.nii.gz", rep, tmp_path / "on_ref.nii.gz")).dataobj)
    expected = np.zeros(ref.shape, np.uint8)
    ok = np.all((idx >= 0) & (idx < ref.shape), axis=1)
    expected[tuple(idx[ok].T)] = label.reshape(-1)[ok]
    assert np.array_equal(back, expected)
