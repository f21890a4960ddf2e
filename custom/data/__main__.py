"""``python -m custom.data DIR``: detect a dataset folder's layout, check every case fully, print a summary."""

from __future__ import annotations

from custom.data.cases import list_cases
from custom.data.errors import BraTSDataError
from custom.data.vocabulary import MODALITIES, describe_sequences


def main(argv: list[str] | None = None) -> int:
    """``python -m custom.data DIR``: detect the layout, check every case fully, print a summary."""
    import argparse

    from custom.data.errors import install_excepthook

    install_excepthook()
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dataset_dir")
    parser.add_argument("--check", default="full", choices=("none", "header", "full"))
    args = parser.parse_args(argv)
    try:
        cases = list_cases(args.dataset_dir, check=args.check)
    except BraTSDataError as e:
        parser.exit(2, f"error: {e}\n")
    layout = cases[0].layout
    labelled = sum(c.label is not None for c in cases)
    print(f"{args.dataset_dir}: layout {layout.name}, {len(cases)} cases ({labelled} labelled), labels {layout.convention.names}")
    for c in cases:
        if not c.complete:
            missing = [m for m in MODALITIES if m not in c.sequences]
            print(f"case {c.case_id}: sequences {describe_sequences(c.sequences)} (missing {describe_sequences(missing)}: zero-filled at inference)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
