"""Ignite / MONAI handlers the bundle's workflows attach, and the checkpoint format.

* :mod:`custom.handlers.checkpoints`: atomic checkpoint saving, weights checked against the configured network;
* :mod:`custom.handlers.tracking`: additions to MONAI's MLflow tracking (run names, parameters, artifacts);
* :mod:`custom.handlers.overlay`: ``ValidationOverlay`` (a PNG of a validation prediction);
* :mod:`custom.handlers.progress`: ``TrainingProgressBar``;
* :mod:`custom.handlers.reference_grid`: ``MapToReference`` (clinical inference: labels onto each study's reference series).
"""
