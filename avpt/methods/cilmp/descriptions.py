"""Per-class description texts in BI-RADS wording, written for this project.

CILMP encodes them into its per-class knowledge states h_c and BiomedAP averages their text
features into its high anchors a_high; both record ``texts_hash`` in their config so a run says
which texts it used. The paper versions use an LLM's token states (CILMP) and expert descriptions
(BiomedAP) that were never published; these are our own, short enough for a 16-token tiny text
tower to keep the key words (open_clip cuts longer texts).
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, Sequence, Tuple

CLASS_DESCRIPTIONS: Dict[str, Tuple[str, ...]] = {
    "normal": (
        "normal breast tissue without a mass",
        "no suspicious mass or calcification, BI-RADS 1",
        "symmetric fibroglandular tissue, negative",
        "homogeneous parenchyma with no focal lesion",
        "normal ducts and fat, no architectural distortion",
    ),
    "benign": (
        "oval circumscribed mass, probably benign",
        "round mass with smooth margins, BI-RADS 3",
        "circumscribed hypoechoic mass with posterior enhancement",
        "equal-density oval mass with well-defined margins",
        "homogeneous mass parallel to the skin, benign",
    ),
    "malignant": (
        "irregular spiculated mass, highly suspicious of malignancy",
        "irregular mass with angular margins, BI-RADS 5",
        "hypoechoic mass with posterior acoustic shadowing",
        "high-density spiculated mass with microcalcifications",
        "mass with rim enhancement and indistinct margins, malignant",
    ),
}

# Class names used by the data loaders and method configs -> the key above.
_ALIASES = {"benign lesion": "benign", "malignant lesion": "malignant", "normal tissue": "normal"}


def descriptions_for(class_name: str) -> Tuple[str, ...]:
    """The description texts of ``class_name`` ("normal", "benign", "malignant" or an alias such
    as "benign lesion")."""
    key = _ALIASES.get(class_name, class_name)
    if key not in CLASS_DESCRIPTIONS:
        raise ValueError(f"no description texts for class {class_name!r}; expected one of "
                         f"{sorted(CLASS_DESCRIPTIONS) + sorted(_ALIASES)}")
    return CLASS_DESCRIPTIONS[key]


def texts_hash(texts: Dict[str, Sequence[str]]) -> str:
    """sha256 (first 16 hex digits) of the texts per class, for the run config."""
    blob = json.dumps({k: list(v) for k, v in sorted(texts.items())}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["CLASS_DESCRIPTIONS", "descriptions_for", "texts_hash"]
