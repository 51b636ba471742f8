"""Synthetic breast phantoms for mammography (MG), ultrasound (US) and MRI slices.

The default data of the project: what trains and evaluates on a fresh machine with no dataset.
Every image is drawn from ``numpy.random.default_rng((seed, modality, patient, view))``, so the
same seed gives the same phantom on every machine, in any order, in any process.

Anatomy (shared by the three modalities, in [0, 1] soft maps):
  * breast: a half ellipse against the chest wall (MG, MRI) or the whole field under the skin (US);
  * glandular: band-limited noise thresholded softly, denser towards the nipple / the chest wall;
  * fatty: breast minus glandular;
  * ductal: a few tortuous ducts converging on the nipple, inside the glandular tissue.
Lesions (one per patient, seen in every view of that patient):
  * benign: round to oval, smooth boundary (radius with only low-order harmonics, small amplitude);
  * malignant: irregular boundary (higher-order harmonics, large amplitude) plus spicules.
Physics:
  * MG: transmitted intensity ``1 - exp(-mu * t)`` with attenuation per tissue (fat < gland <
    lesion), detector blur and quantum noise; malignant lesions carry micro-calcifications;
  * US: echogenicity per tissue (fat hypo-, gland hyperechoic, lesion hypoechoic), multiplicative
    Rayleigh speckle, depth attenuation, posterior acoustic shadowing behind malignant lesions and
    posterior enhancement behind benign ones;
  * MRI: T1 with bright fat; ``phase="post"`` adds contrast enhancement (malignant: strong, with a
    rim; benign: mild and homogeneous) and glandular background enhancement; Rician noise and a
    smooth coil bias field.
Each image also has a patient id and a one-line radiology-style report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from scipy import ndimage

from .modalities import MODALITIES

LABELS = ("benign", "malignant")


@dataclass
class PhantomSample:
    """One phantom image: ``image`` [H, W] float32 in [0, 1]; ``tissue`` [3, H, W] (glandular,
    fatty, ductal) in [0, 1]; ``mask`` [H, W] bool lesion mask; ``label`` 0 benign / 1 malignant."""
    image: np.ndarray
    tissue: np.ndarray
    mask: np.ndarray
    label: int
    modality: str
    patient_id: str
    report: str
    caption: str = ""


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Band-limited Gaussian noise [size, size], zero mean, unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lesion_mask(rng: np.random.Generator, yy, xx, cy: float, cx: float, radius: float,
                 malignant: bool) -> np.ndarray:
    """Binary lesion: a star-shaped region r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)).
    Benign: harmonics 2-3, small amplitude (round/oval, smooth). Malignant: harmonics 3-9 with
    large amplitude (irregular, lobulated) plus 5-9 thin spicules."""
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    r = np.ones_like(theta)
    if malignant:
        for k in rng.choice(np.arange(3, 10), size=4, replace=False):
            r += rng.uniform(0.08, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    else:
        r += rng.uniform(0.05, 0.2) * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
        r += rng.uniform(0.0, 0.04) * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
    mask = dist <= radius * r
    if malignant:
        size = yy.shape[0]
        width = max(0.6, size / 160.0)
        for angle in rng.uniform(0, 2 * np.pi, size=rng.integers(5, 10)):
            length = radius * rng.uniform(0.8, 1.6)
            # distance of each pixel to the spicule segment starting at the lesion boundary
            ux, uy = np.cos(angle), np.sin(angle)
            along = (xx - cx) * ux + (yy - cy) * uy
            across = np.abs(-(xx - cx) * uy + (yy - cy) * ux)
            taper = width * (1.0 - np.clip((along - radius) / length, 0, 1))
            mask |= (along > 0) & (along < radius + length) & (across < taper + 0.35)
    return mask


def _ducts(rng: np.random.Generator, yy, xx, nipple, breast: np.ndarray, size: int) -> np.ndarray:
    """Soft ductal map: 4-7 tortuous lines from the nipple into the breast, Gaussian profile."""
    out = np.zeros((size, size))
    ny, nx = nipple
    for _ in range(rng.integers(4, 8)):
        angle = rng.uniform(-0.9, 0.9) + (np.pi if nx > size / 2 else 0.0)
        y, x = float(ny), float(nx)
        pts = []
        for _ in range(60):
            angle += rng.normal(0, 0.12)
            y += np.sin(angle) * size / 90.0
            x += np.cos(angle) * size / 90.0
            if not (0 <= y < size and 0 <= x < size):
                break
            pts.append((int(y), int(x)))
        line = np.zeros((size, size))
        for py, px in pts:
            line[py, px] = 1.0
        out = np.maximum(out, line)
    out = ndimage.gaussian_filter(out, max(0.6, size / 180.0))
    out = out / (out.max() + 1e-8)
    return np.clip(out * breast, 0, 1)


def make_phantom(seed: int, modality: str, patient: int, view: int = 0, size: int = 224,
                 malignant: Optional[bool] = None, phase: str = "post",
                 lesion_scale: float = 1.0) -> PhantomSample:
    """One phantom image of ``patient`` (its lesion and label are fixed by ``(seed, patient)``;
    ``view`` varies position, breast shape and noise). ``phase``: MRI pre/post contrast.
    ``lesion_scale`` multiplies the lesion radius (7-13% of the image side by default)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if phase not in ("pre", "post"):
        raise ValueError(f"phase must be 'pre' or 'post', got {phase!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    m_idx = MODALITIES.index(modality)
    patient_rng = np.random.default_rng((seed, m_idx, patient))
    if malignant is None:  # balanced classes: odd patients malignant
        malignant = bool(patient % 2)
    radius_frac = patient_rng.uniform(0.07, 0.13) * float(lesion_scale)
    rng = np.random.default_rng((seed, m_idx, patient, view + 1))

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    s = float(size)
    # -- breast outline and tissue ---------------------------------------------------------------
    if modality == "US":
        skin = s * rng.uniform(0.04, 0.07)
        breast = _sigmoid((yy - skin) / 1.0)
        nipple = (0.0, s * rng.uniform(0.3, 0.7))
        density = np.clip(1.0 - np.abs(yy / s - 0.45) * 1.8, 0, 1)  # glandular layer mid-depth
    else:
        left = bool(rng.integers(0, 2)) if modality == "MG" else False
        chest_x = 0.0 if left else s
        ay, ax = s * rng.uniform(0.42, 0.5), s * rng.uniform(0.65, 0.85)
        cy = s * rng.uniform(0.45, 0.55)
        ell = ((yy - cy) / ay) ** 2 + ((xx - chest_x) / ax) ** 2
        breast = _sigmoid((1.0 - ell) * 12.0)
        nipple = (cy, chest_x + (ax if left else -ax))
        # glandular tissue is denser behind the nipple, the fat toward the skin line
        density = np.clip(1.0 - np.sqrt(ell), 0, 1) ** 0.5 * (1.0 - 0.3 * (1 - np.sqrt(np.clip(ell, 0, 1))))
    noise = _smooth_noise(rng, size, s / 28.0)
    gland_level = rng.uniform(-0.2, 0.6)  # breast density varies by patient/view
    glandular = _sigmoid((noise + 1.8 * density - 1.0 - gland_level) * 2.5) * breast
    ductal = _ducts(rng, yy, xx, nipple, breast, size) * np.clip(glandular * 1.5 + 0.2, 0, 1)
    fatty = np.clip(breast - glandular, 0, 1)

    # -- lesion: inside the breast, preferably in glandular tissue --------------------------------
    radius = radius_frac * s
    candidates = np.argwhere((glandular > 0.4) & (breast > 0.95))
    if len(candidates) == 0:
        candidates = np.argwhere(breast > 0.9)
    cy_l, cx_l = candidates[rng.integers(len(candidates))] if len(candidates) else (s / 2, s / 2)
    cy_l = float(np.clip(cy_l, radius * 1.3, s - radius * 1.3))
    cx_l = float(np.clip(cx_l, radius * 1.3, s - radius * 1.3))
    lesion_rng = np.random.default_rng((seed, m_idx, patient, 10_000))  # same shape in every view
    mask = _lesion_mask(lesion_rng, yy, xx, cy_l, cx_l, radius, malignant)
    lesion = ndimage.gaussian_filter(mask.astype(np.float64), 0.7)

    # -- modality physics -------------------------------------------------------------------------
    if modality == "MG":
        mu = 0.35 * fatty + 1.1 * glandular + 0.6 * ductal + (1.6 if malignant else 1.3) * lesion
        thickness = np.sqrt(np.clip(breast, 0, 1))  # compressed breast thins toward the skin line
        img = (1.0 - np.exp(-mu * 1.6 * thickness)) * breast
        if malignant:  # clustered micro-calcifications around the mass
            for _ in range(rng.integers(4, 10)):
                py = int(np.clip(cy_l + rng.normal(0, radius * 0.8), 0, s - 1))
                px = int(np.clip(cx_l + rng.normal(0, radius * 0.8), 0, s - 1))
                img[py, px] = 1.0
        img = ndimage.gaussian_filter(img, 0.6)  # detector blur
        photons = 400.0
        img = rng.poisson(np.clip(img, 0, 1) * photons) / photons  # quantum noise
    elif modality == "US":
        echo = 0.25 * fatty + 0.75 * glandular + 0.1 * ductal
        echo = echo * (1 - lesion) + lesion * (0.05 if malignant else 0.15)
        # posterior features: a column below the lesion, fading with depth
        cols = np.exp(-((xx - cx_l) / (radius * 0.8)) ** 2)
        below = _sigmoid((yy - (cy_l + radius)) / 2.0) * np.exp(-(yy - cy_l) / (s * 0.6))
        if malignant:
            echo = echo * (1 - 0.75 * cols * below)      # acoustic shadowing
        else:
            echo = echo * (1 + 0.6 * cols * below)       # posterior enhancement
        skin_line = np.exp(-((yy - s * 0.03) / 1.5) ** 2)
        echo = echo + 0.8 * skin_line
        depth_gain = np.exp(-1.2 * yy / s)              # attenuation with depth (no TGC)
        speckle = rng.rayleigh(scale=0.8, size=(size, size))
        speckle = ndimage.gaussian_filter(speckle, (0.4, 1.2))  # lateral resolution
        img = echo * depth_gain * speckle
        img = img / (np.percentile(img, 99.5) + 1e-8)
    else:  # MRI, T1-weighted, non-fat-suppressed
        sig = 0.85 * fatty + 0.35 * glandular + 0.3 * ductal
        sig = sig * (1 - lesion) + lesion * 0.3
        if phase == "post":
            sig = sig + 0.1 * glandular  # background parenchymal enhancement
            if malignant:  # strong enhancement with a rim
                rim = np.clip(lesion - ndimage.binary_erosion(mask, iterations=max(1, size // 64)), 0, 1)
                sig = sig + lesion * 0.55 + rim * 0.3
            else:
                sig = sig + lesion * 0.3
        bias = 1.0 + 0.2 * _smooth_noise(rng, size, s / 4.0)
        sig = sig * breast * bias
        noise_std = 0.04
        img = np.hypot(sig + rng.normal(0, noise_std, sig.shape), rng.normal(0, noise_std, sig.shape))
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    tissue = np.stack([glandular, fatty, ductal]).astype(np.float32)
    tissue = np.clip(tissue, 0.0, 1.0)
    pid = f"{modality}-P{patient:04d}"
    return PhantomSample(image=img, tissue=tissue, mask=mask, label=int(malignant), modality=modality,
                         patient_id=pid, report=phantom_report(modality, pid, malignant, cy_l / s,
                                                              cx_l / s, radius_frac),
                         caption=phantom_caption(modality, malignant, cy_l / s, cx_l / s, radius_frac))


def phantom_report(modality: str, patient_id: str, malignant: bool, y: float, x: float,
                   radius_frac: float) -> str:
    """A one-line report of the kind a radiologist would dictate for this phantom."""
    where = ("upper" if y < 0.5 else "lower") + (" outer" if x < 0.5 else " inner")
    size_mm = int(round(radius_frac * 2 * 100))
    if modality == "MG":
        finding = ("irregular spiculated high-density mass with associated microcalcifications"
                   if malignant else "oval circumscribed equal-density mass")
    elif modality == "US":
        finding = ("irregular hypoechoic mass with angular margins and posterior acoustic shadowing"
                   if malignant else "oval circumscribed hypoechoic mass with posterior enhancement")
    else:
        finding = ("irregular mass with rim enhancement and spiculated margins" if malignant
                   else "oval mass with smooth margins and homogeneous enhancement")
    birads = "BI-RADS 5, highly suggestive of malignancy" if malignant else "BI-RADS 3, probably benign"
    return f"{modality} {patient_id}: {size_mm} mm {finding} in the {where} quadrant; {birads}."


_CAPTION_FINDING = {  # (benign, malignant): morphology words that carry the label
    "MG": ("oval circumscribed mass", "irregular spiculated mass calcified"),
    "US": ("oval circumscribed mass enhancement", "irregular angular mass shadowing"),
    "MRI": ("oval smooth mass homogeneous", "irregular spiculated mass rim"),
}


def phantom_caption(modality: str, malignant: bool, y: float, x: float, radius_frac: float) -> str:
    """A short report (about 12 BPE tokens, fits a 16-token text context) for contrastive
    pretraining: modality, label-bearing morphology, position on a 3x3 grid of the image (y, x
    in [0, 1]) and size, e.g. ``"mg irregular spiculated mass calcified upper left 31 mm"``."""
    row = ("upper", "middle", "lower")[min(2, int(y * 3))]
    col = ("left", "centre", "right")[min(2, int(x * 3))]
    size_mm = int(round(radius_frac * 2 * 100))
    return f"{modality.lower()} {_CAPTION_FINDING[modality][int(bool(malignant))]} {row} {col} {size_mm} mm"


def phantom_finding_caption(modality: str, malignant: bool) -> str:
    """The report's finding only: modality and the label-bearing morphology words, e.g.
    ``"us irregular angular mass shadowing"`` (what ``avpt pretrain --captions findings`` uses)."""
    return f"{modality.lower()} {_CAPTION_FINDING[modality][int(bool(malignant))]}"


def phantom_index(num_patients: int, views: int = 2, modalities=MODALITIES) -> List[Dict]:
    """The sample list of a phantom data set: one entry per (modality, patient, view)."""
    return [dict(modality=m, patient=p, view=v) for m in modalities for p in range(num_patients)
            for v in range(views)]
