"""Brain extraction by deepbet (Fisch et al. 2024; MIT), a network trained on real T1-weighted heads.

Its two TorchScript models ship inside the ``deepbet`` wheel (nothing is downloaded). The reference
series is resampled to 1 mm on its own axes (:func:`~custom.preparation.registration.working_image`)
and segmented whole; deepbet crops the head itself. Used by :mod:`custom.preparation.brain`
(methods ``"deepbet"`` and ``"deepbet+atlas"``).
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from custom.preparation.registration import working_image
from custom.preparation.series import image_affine, image_to_array


@functools.lru_cache(maxsize=1)
def _network():
    import torch
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not torch.cuda.is_available())


def deepbet_mask(reference: sitk.Image, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, affine)``: deepbet's brain mask of ``reference`` (bool ``(I, J, K)``) on the reference's
    field of view resampled to ``spacing`` mm along its own axes, and that grid's voxel -> RAS affine (4, 4)."""
    work = working_image(reference, spacing)
    affine = image_affine(work)
    _, mask, _ = _network().run(nib.Nifti1Image(image_to_array(work), affine), threshold=0.5, n_dilate=0)
    return np.asarray(mask.dataobj) > 0, affine
