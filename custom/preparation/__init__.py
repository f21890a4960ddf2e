"""Clinical studies as they come from the scanner -> BraTS-ready input (co-registered, 1 mm, skull-stripped).

* :mod:`custom.preparation.series`: reading a series of any grid (NIfTI -> SimpleITK, RAS <-> LPS);
* :mod:`custom.preparation.registration`: rigid Mattes-MI registration of a series to the reference;
* :mod:`custom.preparation.brain`: brain extraction with the MNI152 atlas nilearn ships and deepbet,
  or the series' own brain when it is already skull-stripped;
* :mod:`custom.preparation.deepbet_brain`: deepbet's network (weights in its wheel) on the reference;
* :mod:`custom.preparation.grid`: the BraTS-like model grid, resampling, N4 bias correction;
* :mod:`custom.preparation.mapping`: a label on the model grid onto the reference's grid, and back;
* :mod:`custom.preparation.study`: :func:`prepare_study`, the whole job, and its report;
* :mod:`custom.preparation.studies`: :class:`PreparedStudies`, a folder of studies (file names -> sequences
  by the series rules) for the bundle's ``configs/clinical.json``;
* :mod:`custom.preparation.errors`: :class:`PreparationError`.

::

    python -m custom.preparation --series t1ce=t1c.nii.gz --series flair=flair.nii.gz --out prepared/ --case P001
"""

from custom.preparation.brain import METHODS, extract_brain
from custom.preparation.errors import PreparationError
from custom.preparation.mapping import load_report, map_from_reference, map_to_reference
from custom.preparation.registration import Registration, register_rigid
from custom.preparation.series import image_affine, image_from_array, read_series
from custom.preparation.studies import PreparedStudies, study_series
from custom.preparation.study import default_reference, output_name, prepare_study

__all__ = [
    "METHODS", "PreparationError", "Registration", "default_reference", "extract_brain", "image_affine", "image_from_array", "load_report",
    "map_from_reference", "map_to_reference", "output_name", "prepare_study", "read_series", "register_rigid", "PreparedStudies", "study_series",
]
