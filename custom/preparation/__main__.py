"""``python -m custom.preparation --series SEQ=PATH ... --out DIR``: prepare one study (see :func:`prepare_study`)."""

from __future__ import annotations

import argparse
import json
import sys

from custom.data.errors import install_excepthook
from custom.preparation.brain import METHODS
from custom.preparation.mapping import map_to_reference
from custom.preparation.study import N4_SEQUENCES, bias_correction_option, prepare_study


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m custom.preparation", description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("--series", action="append", default=[], metavar="SEQ=PATH", help="a series: t1, t1ce, t2 or flair (or an alias) = NIfTI path")
    ap.add_argument("--out", required=True, help="output folder (or, with --map, the output label file)")
    ap.add_argument("--case", default="case", help="case id of the output files")
    ap.add_argument("--reference", help="reference series (default: t1ce, else flair, else t2)")
    ap.add_argument("--bias-correction", nargs="*", metavar="SEQ", help="N4 bias-field correction of the series named (default: "
                    f"{' '.join(N4_SEQUENCES)}), of every series (no name) or of none (none)")
    ap.add_argument("--spacing", type=float, default=1.0, help="model grid voxel size, mm")
    ap.add_argument("--brain-method", choices=METHODS, default="auto")
    ap.add_argument("--map", metavar="LABEL", help="instead: map LABEL (on the prepared grid) back onto the reference grid; "
                    "--report gives the prepared folder or report")
    ap.add_argument("--report", help="with --map: the prepared folder or its *_preparation.json")
    args = ap.parse_args(argv)
    install_excepthook()
    if args.map:
        if not args.report:
            ap.error("--map needs --report")
        print(map_to_reference(args.map, args.report, args.out))
        return 0
    series = {}
    for item in args.series:
        if "=" not in item:
            ap.error(f"--series {item!r}: expected SEQ=PATH")
        k, v = item.split("=", 1)
        series[k] = v
    report = prepare_study(series, args.out, args.reference, bias_correction_option(args.bias_correction), args.case, args.spacing, args.brain_method)
    print(json.dumps({"case_id": report["case_id"], "reference": report["reference"]["sequence"], "brain_ml": report["brain"]["volume_ml"],
                      "seconds": report["seconds"], "mutual_information": {s: r["registration"]["mutual_information"] for s, r in report["series"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
