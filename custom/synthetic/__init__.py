"""Generated BraTS-like glioma cases on real anatomy: the project's training data and test fixtures.

Anatomy: the MNI ICBM152 2009a tissue maps that nilearn ships, warped per case, with mass effect,
ventricles, choroid plexus, vessels, white-matter hyperintensities and a ragged skull-stripping
border (:mod:`~custom.synthetic.anatomy`). Tumours of four types, sometimes multifocal, 1-250 mL,
oedema infiltrating along white matter (:mod:`~custom.synthetic.tumour`). Images with contrasts
drawn per case and per sequence (a share at random, SynthSeg style), partial volume, thick slices,
ringing, ghosts, bias fields, Rician noise and four intensity styles (:mod:`~custom.synthetic.imaging`).
Written in the BraTS 2021, 2023 or MSD Task01 layouts (:mod:`~custom.synthetic.dataset`)::

    python -m custom.synthetic --out data/pool --cases 400 --seed 1 --size medium --workers 2

Case ``i`` of dataset ``seed`` comes from ``np.random.default_rng([seed, i])``: it does not depend
on how many cases are written, and the same seed writes the same bytes.
"""

from custom.synthetic.dataset import (
    LAYOUT_NAMES,
    case_id,
    encode_labels,
    main,
    msd_dataset_json,
    planned_files,
    write_dataset,
)
from custom.synthetic.generator import generate_case
from custom.synthetic.grid import SIZES, grid_affine, grid_shape, grid_spacing
from custom.synthetic.raw_study import RawStudy, generate_raw_study
from custom.synthetic.tumour import ED, ET, NCR, TYPES

__all__ = [
    "NCR", "ED", "ET", "TYPES", "LAYOUT_NAMES", "SIZES", "grid_shape", "grid_spacing",
    "grid_affine", "generate_case", "case_id", "planned_files", "write_dataset", "msd_dataset_json",
    "encode_labels", "main", "RawStudy", "generate_raw_study",
]
