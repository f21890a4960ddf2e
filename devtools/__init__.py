"""Development machinery shared by the tests, the benchmarks and the tools (not part of the library).

* ``REPO``: the repository root; ``CONFIGS``: the bundle's configs;
* :mod:`devtools.mlapp_server`: a MONAI Label server of the app on loopback, on a copy of the bundle;
* :mod:`devtools.orthanc`: the project's Orthanc (DICOMweb PACS), installed with :mod:`devtools.debian`;
* :mod:`devtools.cdp`: a Chromium DevTools-protocol client (the OHIF test).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
