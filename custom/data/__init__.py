"""The data layer: the BraTS vocabulary, release layouts, hardened NIfTI reading, datalists.

* :mod:`custom.data.vocabulary`: sequences, regions, label conventions, layouts (defined once);
* :mod:`custom.data.errors`: ``BraTSDataError``, ``NotNiftiError``, ``OutputError``;
* :mod:`custom.data.nifti`: NIfTI files checked before their voxels are read;
* :mod:`custom.data.cases`: a dataset folder's layout and cases;
* :mod:`custom.data.datalist`: cross-validation datalists;
* :mod:`custom.data.batch`: checks and summary of a batch inference run;
* :mod:`custom.data.dicom_series`: which DICOM series (by SeriesDescription) is which sequence;
* :mod:`custom.data.dicom_files`: the DICOM series among files on disk, and one as a NIfTI volume.
"""

from custom.data.cases import (
    find_case,
    load_case,
    BraTSCase,
    case_id_from_path,
    check_label_values,
    check_sequences,
    detect_layout,
    list_cases,
    validate_case,
)
from custom.data.errors import BraTSDataError, NotNiftiError, OutputError, clear_error, data_error_message, install_excepthook
from custom.data.nifti import (
    MAX_ABS_INTENSITY,
    MAX_FOV_MM,
    MAX_HEADER_BYTES,
    MAX_IMAGE_BYTES,
    check_header,
    check_image_voxels,
    load_nifti,
    load_voxels,
)
from custom.data.vocabulary import (
    CONVENTIONS,
    LAYOUTS,
    MODALITIES,
    MSD_CHANNELS,
    NIFTI_SUFFIXES,
    REGIONS,
    REQUIRED_ANY,
    SEQUENCE_ALIASES,
    SEQUENCE_NAMES,
    LabelConvention,
    Layout,
    describe_sequences,
    strip_nifti_suffix,
)
