"""Render a case to PNG: T1, T1ce, T2, FLAIR and FLAIR + label on the axial slice with the most tumour.

::

    python -m tools.render_case data/synthetic/BraTS2021_00000 --out case.png      # BraTS 2021/2023 folder
    python -m tools.render_case data/msd/imagesTr/BRATS_001.nii.gz --out case.png  # MSD 4D image (label from ../labelsTr)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from custom.data import BraTSDataError, load_case, load_nifti, load_voxels
from custom.render import render_case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.render_case", description=__doc__.splitlines()[0])
    p.add_argument("case", type=Path, help="case folder (BraTS 2021/2023) or MSD 4D image (label from ../labelsTr)")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default: <case id>.png in the current folder)")
    p.add_argument("--dpi", type=int, default=150)
    args = p.parse_args(argv)
    try:
        case, volumes = load_case(args.case)
        label = np.asarray(load_voxels(load_nifti(case.label, case.case_id), case.label, case.case_id)) if case.label else None
        out = args.out or Path(f"{case.case_id}.png")
        render_case({m: v for m, (v, _) in volumes.items()}, label, out, affine=next(iter(volumes.values()))[1],
                    convention=case.layout.convention, title=case.case_id, dpi=args.dpi)
    except (BraTSDataError, ValueError) as e:
        p.error(str(e))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
