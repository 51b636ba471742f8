"""Which series of a Duke-Breast-Cancer-MRI patient is the pre-contrast and which the first
post-contrast dynamic (fat-saturated T1) acquisition: by what the headers say, not by one naming
habit.

The data set (TCIA, 922 patients, several scanners 2000-2014) names its series two main ways:

* ``ax dyn pre``, ``ax dyn 1st pass`` .. ``ax dyn 4th pass`` (also ``ax 3d dyn pre``,
  ``ax 3d dyn 1st pass``, ``1st ax dyn``, ``t1_fl3d_tra_dynVIEWS_spair 1st pass``, the typo
  ``ax dyn 1st pas``);
* a bare name for the pre-contrast series (``ax dyn``, ``ax 3d dyn``, ``ax 3d dyn MP``,
  ``ax dynamic``, ``Ax Vibrant MultiPhase``) and ``Ph1/<same name>`` .. ``Ph4/<same name>`` for
  the post-contrast phases (TCIA's folder names drop the slash: ``Ph1ax 3d dyn``).

Beside them, non-fat-saturated T1 series (``ax t1``, ``ax t1 pre``, ``ax t1 +c``, ``ax t1 tse``,
``Ax 3D T1 NON FS``, ``ax 3d t1 bilateral``, ``AX IDEAL Breast``) are never the dynamic series,
whatever their series number or a "pre" in their name. (The collection's SeriesDescriptions
as listed and typed fat-saturated / non-fat-saturated / phase N by github.com/LangDaniel/MAEMI
utils/download_MRI_data.py; "ax t1" as non-fat-saturated T1 per the data set's forum,
reddit.com/r/DukeDCEMRIData "what do the DICOM stacks represent specifically".)

Resolution (``resolve``): dynamic series = descriptions naming a dynamic acquisition (``dyn``,
``dynamic``, ``vibrant``, ``multiphase``) or the fat-saturated ``ax 3d pre``; a phase number
from ``PhN`` or an ordinal (``1st`` .. ``4th``); ``pre`` or no number = pre-contrast. Exactly
one series must remain for the phase asked (pre-contrast, or phase 1). When no series carries a
phase number and several bare dynamic series do, they are ordered by acquisition time (first =
pre, second = phase 1) if every one has a distinct time. The acquisition order (the first of
Acquisition, Trigger, Content, Series Time that both series carry with different values, else
the series number) must put every pre-contrast candidate before phase 1. Anything else is
unresolved, with the reason, never guessed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

HEADER_TAGS = ("SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "InstanceNumber",
               "ImagePositionPatient", "ImageOrientationPatient", "AcquisitionTime",
               "TriggerTime", "SeriesTime", "ContentTime")
TIME_TAGS = ("AcquisitionTime", "TriggerTime", "ContentTime", "SeriesTime")
_ORDINALS = {"1st": 1, "2nd": 2, "3rd": 3, "4th": 4, "5th": 5, "6th": 6}
_DYNAMIC = re.compile(r"dyn|vibrant|multiphase|^ax 3d pre$")
_NON_FS_T1 = re.compile(r"\bnon fs\b|\bideal\b|\bt1\b")


class Unresolved(Exception):
    """A patient's pre-/post-contrast series cannot be told apart; the message says why."""


@dataclass
class Series:
    uid: str
    description: str
    number: int
    slices: List[Tuple[Optional[int], Optional[float], str]] = field(default_factory=list)
    # tag -> seconds, per slice that has it (AcquisitionTime, TriggerTime, ContentTime, SeriesTime)
    times: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return classify(self.description)[0]

    @property
    def phase(self) -> Optional[int]:
        return classify(self.description)[1]

    def time(self, tag: Optional[str] = None) -> Optional[float]:
        """Earliest time of the series from ``tag``, or from the first tag it has."""
        for t in ([tag] if tag else TIME_TAGS):
            if self.times.get(t):
                return min(self.times[t])
        return None

    def summary(self) -> Dict:
        return {"description": self.description, "series_number": self.number,
                "series_uid": self.uid, "slices": len(self.slices),
                "acquisition_time_s": self.time()}


def normalise(description: str) -> str:
    d = description.lower().replace("_", " ")
    d = re.sub(r"^ph(\d)\s*/?\s*", r"ph\1 ", d)          # Ph1/ax dyn, Ph1ax dyn -> ph1 ax dyn
    return re.sub(r"\s+", " ", d).strip()


def classify(description: str) -> Tuple[str, Optional[int]]:
    """(kind, phase): kind 'dynamic', 't1' (non-fat-saturated T1) or 'other'; phase 0 for an
    explicit pre-contrast dynamic series, k >= 1 for post-contrast phase k, None for a dynamic
    series whose name carries no phase (the bare-name convention's pre-contrast series)."""
    d = normalise(description)
    if not _DYNAMIC.search(d):
        return ("t1" if _NON_FS_T1.search(d) else "other"), None
    m = re.match(r"ph(\d)\b", d)
    if m:
        return "dynamic", int(m.group(1))
    for word, k in _ORDINALS.items():
        if re.search(rf"\b{word}\b", d):
            return "dynamic", k
    if re.search(r"\bpre\b", d):
        return "dynamic", 0
    return "dynamic", None


def dicom_seconds(value) -> Optional[float]:
    """DICOM TM (HHMMSS.ffffff, possibly shortened) -> seconds since midnight."""
    s = str(value or "").strip()
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", s)
    if not m:
        return None
    h, mi, se = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    return h * 3600 + mi * 60 + se + float(m.group(4) or 0)


def header_times(h) -> Dict[str, float]:
    """tag -> seconds for the time tags one slice header has (TriggerTime is in ms)."""
    out = {}
    for tag in TIME_TAGS:
        v = getattr(h, tag, None)
        if tag == "TriggerTime":
            t = float(v) / 1000.0 if v not in (None, "") else None
        else:
            t = dicom_seconds(v)
        if t is not None:
            out[tag] = t
    return out


def slice_position(h) -> Optional[float]:
    """Position of a slice along its normal (ImagePositionPatient . (row x column))."""
    ipp, iop = getattr(h, "ImagePositionPatient", None), getattr(h, "ImageOrientationPatient", None)
    if ipp is None or iop is None or len(iop) != 6 or len(ipp) != 3:
        return None
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return float(np.dot(normal, np.asarray(ipp, float)))


def ordered_slices(series: Series, order: str = "instance") -> Tuple[List[str], str]:
    """(slice paths, how ordered). ``instance``: by InstanceNumber (the annotation table's
    convention), falling back to position when InstanceNumbers are missing or repeated;
    ``position``: by position along the slice normal, ascending."""
    inst = [i for i, _, _ in series.slices]
    pos = [p for _, p, _ in series.slices]
    if None not in pos and len(set(np.round(pos, 3))) < len(pos):
        raise Unresolved(f"series {series.description!r} has {len(pos)} slices at "
                         f"{len(set(np.round(pos, 3)))} positions (several phases or a repeat "
                         f"in one series)")
    usable_inst = None not in inst and len(set(inst)) == len(inst)
    usable_pos = None not in pos
    if not usable_inst and not usable_pos:
        raise Unresolved(f"series {series.description!r} has repeated or missing InstanceNumbers "
                         f"and no slice positions")
    if order == "instance" and usable_inst:
        return [p for _, _, p in sorted(series.slices, key=lambda s: s[0])], "InstanceNumber"
    if order == "instance" or usable_pos:
        how = "position (InstanceNumber unusable)" if order == "instance" else "position"
        return [p for _, _, p in sorted(series.slices, key=lambda s: s[1])], how
    raise Unresolved(f"series {series.description!r}: slice positions missing, cannot order by "
                     f"position")


def acquired_before(a: Series, b: Series) -> Tuple[Optional[bool], str]:
    """(whether ``a`` was acquired before ``b``, on what basis): the first time tag both series
    carry with different values, else the series number; (None, ..) when nothing tells."""
    for tag in TIME_TAGS:
        ta, tb = a.time(tag), b.time(tag)
        if ta is not None and tb is not None and ta != tb:
            return ta < tb, tag
    if a.number != b.number:
        return a.number < b.number, "SeriesNumber"
    return None, "nothing"


def resolve(series: List[Series], phase: str) -> Tuple[Series, str]:
    """(the series of ``phase`` 'pre' or 'post' (= the first post-contrast phase), how it was
    told). Raises ``Unresolved`` naming what is ambiguous or missing."""
    names = sorted(f"{s.number}:{s.description}" for s in series)
    dynamic = [s for s in series if s.kind == "dynamic"]
    if not dynamic:
        raise Unresolved(f"no dynamic (fat-saturated) series among {names}")
    pres = [s for s in dynamic if s.phase in (0, None)]
    firsts = [s for s in dynamic if s.phase == 1]
    phased = [s for s in dynamic if s.phase not in (0, None)]
    how = "by name"
    if not phased and len(pres) >= 2:
        tag = next((t for t in TIME_TAGS if all(s.time(t) is not None for s in pres)), None)
        if tag is None or len({s.time(tag) for s in pres}) != len(pres):
            raise Unresolved(f"{len(pres)} dynamic series with no phase in their names and no "
                             f"distinct acquisition times to order them: {names}")
        by_time = sorted(pres, key=lambda s: s.time(tag))
        pres, firsts, how = [by_time[0]], [by_time[1]], "by acquisition time (names carry no phase)"
    if phase == "pre" and len(pres) != 1:
        raise Unresolved(f"{len(pres)} pre-contrast dynamic series candidates "
                         f"{sorted(s.description for s in pres)} among {names}")
    if phase == "post" and len(firsts) != 1:
        what = "no" if not firsts else f"{len(firsts)}"
        raise Unresolved(f"{what} first post-contrast series among {names}")
    for pre in pres:        # every pre-contrast candidate must come before phase 1
        for first in firsts:
            before, basis = acquired_before(pre, first)
            if before is False:
                raise Unresolved(f"{basis} puts {pre.description!r} after {first.description!r}: "
                                 f"the names contradict the acquisition order")
    return (pres[0] if phase == "pre" else firsts[0]), how
