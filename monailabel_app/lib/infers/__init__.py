from .brats_bundle import BraTSBundleInfer

__all__ = ["BraTSBundleInfer"]
