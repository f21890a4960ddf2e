from .brats_bundle import BraTSBundleTrain

__all__ = ["BraTSBundleTrain"]
