"""DICOM series of a study -> BraTS sequences, by SeriesDescription (configurable rules).

``SERIES_RULES`` / :func:`match_series` find the modality series of a study (used by the MONAI
Label DICOMweb datastore, and on file names by ``custom.preparation.studies``); series written by
``tools/nifti_to_dicom.py`` are described with ``custom.data.SEQUENCE_NAMES`` (T1, T1ce, T2, FLAIR).
Where several series match one sequence (a 3D acquisition and its reformats, an axial 2D series
beside a 3D one), the largest is used: most voxels (NIfTI) or instances (DICOM).
:mod:`custom.data.dicom_files` finds the series among files on disk and writes one as NIfTI.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

from custom.data.vocabulary import MODALITIES, REQUIRED_ANY, SEQUENCE_NAMES

logger = logging.getLogger(__name__)

# Token boundaries for the description rules: letters and digits are word characters, "_", "-",
# spaces, "+" etc. separate tokens ("AX_T2_FLAIR", "t1-ce", "T1 +C").
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"
_PRE_CONTRAST = rf"{_B}(pre|precontrast|native|nativ|without|wo|w/o|non[\s_-]*contrast|plain){_E}"
_NOT_STRUCTURAL = (rf"{_B}(perf|perfusion|dce|dsc|dyn|dynamic|dwi|dti|diff|diffusion|adc|trace|map|mapping|"
                   rf"subtraction|mip|pd){_E}")
_T1 = r"s?t1(w)?"  # "T1", "T1w", Philips "sT1W"
_T1_SEQUENCE = rf"({_T1}|mp[\s_-]?rage|spgr|fspgr|bravo|tfe)"
_CONTRAST = (rf"(?:{_B}(post(?![\s_-]*op)|gd|gad|gado|gadolinium|contrast|ce|km|c\+)"  # km: Kontrastmittel
             rf"|\+\s*(c|gd|gad|km))(?![a-z0-9])")
SERIES_RULES: dict[str, str] = {
    "flair": rf"^(?!.*{_NOT_STRUCTURAL})(?:.*(?<!t1[\s_-])(?<!t1w[\s_-])(?<!t1)flair|.*{_B}t2[\s_-]*f{_E}|.*dark[\s_-]*fluid)",
    "t1ce": (rf"{_B}ce-[a-z0-9]+{_E}.*{_B}t1w{_E}"  # BIDS: sub-01_ce-gd_T1w
             rf"|^(?!.*({_PRE_CONTRAST}|{_NOT_STRUCTURAL}))(?:.*{_B}{_T1}[\s_-]*(ce|c|gd|gad|km|post(?![\s_-]*op)|\+\s*c|\+\s*gd|\+)(?![a-z0-9])"
             rf"|.*{_B}(ce|c|gd|gad)[\s_-]*{_T1}{_E}"
             rf"|.*{_B}{_T1_SEQUENCE}{_E}.*{_CONTRAST}"
             rf"|.*{_CONTRAST}.*{_B}{_T1_SEQUENCE}{_E})"),
    "t2": rf"^(?!.*(\*|{_B}(star|gre|swi|ffe|fgre|hemo|haemo){_E}|{_NOT_STRUCTURAL}))(?:.*{_B}s?t2(w)?{_E})",
    "t1": rf"^(?!.*{_NOT_STRUCTURAL})(?:.*{_B}s?t1(w|n)?{_E}|.*mp[\s_-]?rage|.*spgr)",
}
"""Default rules: a case-insensitive ``re.search`` on SeriesDescription per modality. A series goes to
the first modality whose rule matches, tried in ``RULE_ORDER`` (FLAIR before T2, T1ce before T1, so
"T2 FLAIR" is a FLAIR and "T1 post Gd" a T1ce). T1ce: "T1ce", "t1c", "T1 post Gd", "AX T1+C", "ceT1",
"CT1", "MPRAGE GD", "POST GAD AX T1", Siemens "t1_se_tra_KM" (Kontrastmittel), BIDS "ce-gd_T1w", but not with a
pre-contrast word ("SAG T1 PRE GD", "T1 native": T1) nor "T1 POST OP". FLAIR: not "T1 FLAIR" (a T1-weighted
sequence). T2: not T2* ("T2*", "T2 GRE", "T2 star", SWI) nor "PD/T2". None of them: perfusion, dynamic, diffusion,
subtraction, MIP and parameter-map series ("DCE T1", "t1_vibe_dyn", "T2 DWI", "T1 MAP"), whose many instances
would otherwise make them the largest series of their sequence."""
RULE_ORDER = ("flair", "t1ce", "t2", "t1")


class SeriesMatchError(LookupError):
    """A study whose MR series do not give exactly one series per modality."""


def parse_rules(rules: str | Mapping[str, str] | None) -> dict[str, re.Pattern]:
    """Compile description rules: ``None`` = ``SERIES_RULES``; a mapping or a JSON object text of
    modality -> regex overriding some of them; or the path of a JSON file holding such an object."""
    given: Mapping[str, str] = {}
    if isinstance(rules, str) and rules.strip():
        text = rules.strip()
        if not text.startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as e:
                raise ValueError(f"series rules: {rules!r} is neither a JSON object nor a readable file ({e})") from e
        try:
            given = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"series rules must be a JSON object of modality -> regular expression: {e}") from e
    elif isinstance(rules, Mapping):
        given = rules
    if not isinstance(given, Mapping):
        raise ValueError("series rules must be a JSON object of modality -> regular expression")
    unknown = sorted(set(given) - set(MODALITIES))
    if unknown:
        raise ValueError(f"series rules: unknown modality {unknown}; use {list(MODALITIES)}")
    merged = {**SERIES_RULES, **given}
    compiled = {}
    for m in RULE_ORDER:
        try:
            compiled[m] = re.compile(merged[m], re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"series rules: {m}: invalid regular expression {merged[m]!r}: {e}") from e
    return compiled


def classify(description: str, rules: Mapping[str, re.Pattern]) -> str | None:
    """The modality of a series description (first rule in ``RULE_ORDER`` that matches), or None."""
    for m in RULE_ORDER:
        if rules[m].search(description or ""):
            return m
    return None


def match_series(series: Sequence[Mapping], rules: Mapping[str, re.Pattern], where: str = "study", allow_missing: bool = False) -> dict[str, Mapping]:
    """Pick one series per modality from ``series`` (dicts with ``SeriesInstanceUID``,
    ``SeriesDescription``, ``SeriesNumber``). Raises ``SeriesMatchError`` listing every series found
    when a modality has none, or several of which none is the largest.

    ``allow_missing``: modalities without a series are left out of the result (canonical order)
    as long as FLAIR or T2 has one (``custom.data.REQUIRED_ANY``: what the model needs).

    Several series for one modality: the largest (:func:`series_size`: ``voxels``, else ``instances``)
    is used, logged, and given a ``passed_over`` list of the others' descriptions; an error when
    the largest two are the same size (or of unknown size)."""
    hits: dict[str, list[Mapping]] = {m: [] for m in MODALITIES}
    for s in series:
        m = classify(str(s.get("SeriesDescription") or ""), rules)
        if m:
            hits[m].append(s)
    for m, h in hits.items():
        if len(h) > 1:
            ranked = sorted(h, key=lambda s: -series_size(s))
            if series_size(ranked[0]) > series_size(ranked[1]):
                others = [_describe(s) for s in ranked[1:]]
                hits[m] = [{**ranked[0], "passed_over": others}]
                logger.info(f"{where}: {len(h)} series match {SEQUENCE_NAMES[m]}; using the largest, {_describe(ranked[0])}, "
                            f"over {', '.join(others)}")
    missing = [SEQUENCE_NAMES[m] for m in MODALITIES if not hits[m]]
    several = {SEQUENCE_NAMES[m]: h for m, h in hits.items() if len(h) > 1}
    if allow_missing and any(hits[m] for m in REQUIRED_ANY):
        missing = []
    if missing or several:
        listing = "; ".join(
            f"#{s.get('SeriesNumber', '?')} {str(s.get('SeriesDescription') or '')!r} ({s.get('Modality', '?')}) -> "
            f"{SEQUENCE_NAMES.get(classify(str(s.get('SeriesDescription') or ''), rules) or '', 'no modality')}"
            for s in sorted(series, key=lambda s: (str(s.get("SeriesNumber", "")), str(s.get("SeriesDescription", ""))))
        ) or "no series"
        problems = []
        if missing:
            problems.append(f"no series for {', '.join(missing)}")
        for name, h in several.items():
            problems.append(f"{len(h)} series of the same size match {name}")
        need = ("one series of FLAIR or T2" if allow_missing else "a series each of T1, T1ce, T2, FLAIR") + \
            ", and of several series of one sequence one larger than the others"
        raise SeriesMatchError(
            f"{where}: {'; '.join(problems)} (need {need}; series found: {listing}); "
            f"adjust the SeriesDescription rules (--conf dicomweb_series_rules)"
        )
    return {m: hits[m][0] for m in MODALITIES if hits[m]}


def series_size(series: Mapping) -> int:
    """How large a series is, to choose among several of one sequence: its ``voxels`` (a NIfTI file), else its
    ``instances`` (DICOM NumberOfSeriesRelatedInstances: slices of a 2D series), else 0 (unknown)."""
    return int(series.get("voxels") or series.get("instances") or 0)


def _describe(series: Mapping) -> str:
    size = f"{series['voxels']} voxels" if series.get("voxels") else f"{series.get('instances') or '?'} instances"
    return f"#{series.get('SeriesNumber', '?')} {str(series.get('SeriesDescription') or '')!r} ({size})"
