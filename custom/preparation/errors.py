"""The error of study preparation: a study that cannot be made BraTS-ready."""

from __future__ import annotations

from custom.data.errors import BraTSDataError


class PreparationError(BraTSDataError):
    """A study that cannot be prepared: a sequence missing or unknown, a series that does not overlap the
    reference, a registration whose similarity stays poor, no brain found. The message names the series."""
