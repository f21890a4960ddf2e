"""Request parameters: one parser for true/false flags (MONAI Label's ``strtobool``), invalid -> HTTP 422."""

from typing import Any

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.utils.others.generic import strtobool


def truthy(value: Any, name: str = "flag") -> bool:
    """Request/config flags arrive as bools, numbers or strings ('true', 'false', '1', '0', 'yes', 'off'...);
    anything else is an invalid input (HTTP 422 through the app's error handling)."""
    try:
        return bool(strtobool(str(value).strip()))
    except ValueError:
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"{name} must be true or false, got {value!r}") from None


MAX_MC_SAMPLES = 64


def mc_samples(value: Any, limit: int = MAX_MC_SAMPLES) -> int:
    """Number of Monte-Carlo dropout samples: an integer in ``2..limit``; anything else is HTTP 422."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if not 2 <= n <= limit:
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"mc_samples must be an integer in 2..{limit}, got {value!r}")
    return n
