from .brats import BraTSDatastore, CheckedLocalDatastore, open_datastore

__all__ = ["BraTSDatastore", "CheckedLocalDatastore", "open_datastore"]
