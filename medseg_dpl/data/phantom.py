"""Synthetic abdomen CT phantom: the project's embedded default data set.

``make_phantom(out_dir, layout="synapse"|"amos", cases=N, seed=S)`` writes N CT-like cases in
the *exact* raw layout of the real data set, so ``check``/``prep``/``split``/training run on it
unchanged:

* Synapse/BTCV: ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz``.
* AMOS22: ``dataset.json`` (AMOS22 keys: name, labels, numTraining, training, validation, ...),
  ``imagesTr/amos_0001.nii.gz``, ``labelsTr/``, ``imagesVa/``, ``labelsVa/`` (the last
  ``va_fraction`` of the cases go to ``*Va``).

Label numbering is that of :mod:`medseg_dpl.data.labels` (Synapse 13 organs, AMOS 15).

What it models
--------------
Every case is built in a patient frame (RAS, millimetres, origin on the body axis at the renal
hilum level) and sampled on the voxel grid:

* a body: elliptical cross-section (per-case size), subcutaneous fat, an abdominal muscle wall,
  air outside; a spine (vertebral bodies with cortical/cancellous bone, discs, spinal canal,
  posterior elements), paraspinal and psoas muscles, lower ribs, iliac wings, femoral heads;
  lung bases and the heart at the top; bowel loops (soft tissue and gas mixed into visceral fat
  by a smooth random field) and the rectum fill the rest of the abdominal cavity;
* organs as ellipsoids (some rotated, the liver and stomach as unions of pieces) and tubes along
  curves (aorta, IVC, esophagus, portal/splenic/superior mesenteric veins, pancreas, duodenum,
  iliac vessels), at anatomical positions: liver right-upper with a left lobe over the stomach,
  gallbladder under the liver, spleen left-posterior, kidneys posterior on both sides of the
  psoas (right lower than left), adrenals on top of the kidneys, aorta left-anterior of the
  spine, IVC to its right running into the liver, pancreas across behind the stomach from the
  duodenal C-loop to the splenic hilum, bladder and prostate (or uterus) in the pelvis.
  Nominal volumes follow published adult means (liver ~1.5 l, spleen ~0.2 l, kidneys ~0.15 l
  each, stomach ~0.3 l, pancreas ~80 ml, gallbladder ~30 ml, adrenals ~5 ml each);
* overlap is resolved by a fixed priority order (bone and muscles, then vessels, small organs,
  ..., the liver last, then lungs and bowel): a structure only claims voxels nobody claimed
  before, so no two labels overlap and e.g. the IVC and portal vein cut through the liver;
* structures that the layout does not annotate are still in the image but labelled background
  (portal/splenic veins in AMOS; duodenum, bladder, prostate/uterus in Synapse; always the
  iliac vessels, bowel, heart, lungs, bones, muscles), as in the real annotations;
* per-case variation as between adult abdominal CTs (table below): body habitus (frame size,
  subcutaneous fat), the vertebral level of the upper-abdominal organs (liver dome, spleen,
  stomach, pancreas, kidneys) and of the kidneys on top, organ volumes (log-normal) and shapes,
  stomach and gallbladder filling, positions and rotations, the scan's craniocaudal extent, a
  smooth low-frequency displacement field (sum of random sinusoids, ~5-8 mm) that bends every
  structure, bladder filling, sex;
* intensities in HU that depend on a contrast phase drawn per case (non-contrast, arterial,
  portal venous, delayed) with per-organ jitter and smooth texture, so organ HU ranges overlap
  (liver, spleen, pancreas, kidneys, vessels, bowel wall and muscle all sit in 30-200 HU
  depending on phase): intensity alone does not separate organs, position and context do;
  kidneys have cortex/medulla, the stomach and duodenum gas/fluid/food content;
* acquisition: Gaussian noise then a slight Gaussian blur (correlated noise and partial-volume
  smoothing of the image; the label is sampled at voxel centres), int16 HU;
* geometry: anisotropic spacing and non-trivial affines. In-plane spacing is a nominal
  0.7-1.0 mm scaled by 512/X (at least enough for the body to fit), the slice spacing is the
  craniocaudal field of view (~40-54 cm, from 1.5-10 cm above the liver dome to below the
  prostate) over Z; axes are
  RAS, LPS (DICOM-derived) or LAS oriented, with a scanner-table origin offset. ``spacing=``
  fixes the spacing instead (then the field of view may cut organs).

Every labelled organ is present in every case: if sampling misses one (a tiny grid, or a
``spacing`` whose field of view cuts it off), its centre voxel and the unclaimed voxels of the
3x3x3 neighbourhood are assigned to it. At the default size (80, 80, 64) the smallest organs
(adrenals) have a few dozen voxels; at 32-48^3 a handful.

Per-case variation
------------------
Magnitudes from the anatomy/radiology literature for adults, fixed before any benchmark was run
and never tuned for a method (issue 9). SD: standard deviation; "log SD": SD of log(volume),
about the coefficient of variation (CV). Organ positions are in the patient frame, against the
spine; measured in the scan's own frame the spreads are larger (the scan extent varies too):
over 40 cases the kidney centroid's craniocaudal SD from the scan centre is ~21 mm (~13 mm
before issue 9), liver volume CV ~0.21, spleen ~0.30, stomach ~0.31.

Each line: quantity: phantom draw | literature value | source.

* level of the upper-abdominal organs against the spine (liver dome, spleen, stomach, pancreas,
  kidneys, heart, lung bases together): N(0, 15) mm craniocaudal, clipped to +-40 | diaphragm
  domes, transpyloric plane and renal hila lie within about +-1 vertebra (~+-35 mm) of their
  usual level; breath-hold depth adds to it (quiet-breathing liver excursion 10-25 mm) |
  Mirjalili et al. 2012, Clin Anat 25 (thoracic and abdominal surface anatomy on CT at end-tidal
  respiration); Langen & Jones 2001, Int J Radiat Oncol Biol Phys 50:265 (organ motion review);
* kidney level, both kidneys, on top: N(0, 10) mm, clipped to +-30 | renal hila at L1-L2,
  +-1 vertebra | Mirjalili et al. 2012, Clin Anat 25;
* right kidney below the left: N(16, 7) mm | ~1-2 cm | Standring (ed.), Gray's Anatomy, 41st
  ed., Elsevier 2016;
* liver volume: median ~1.35 l, log SD 0.20 (+ shape) | ~1.5 l, SD ~20-25 % of the mean |
  Heinemann et al. 1999, Liver Transpl Surg 5:366; Vauthey et al. 2002, Liver Transpl 8:233;
  left-lobe size: a further log SD 0.30 (assumed);
* spleen volume: median ~0.21 l, log SD 0.27 | CT mean 215 ml, range 107-315 ml; length ~7-13
  cm | Prassopoulos et al. 1997, Eur Radiol 7:246; Chow et al. 2016, Radiology 279:306;
* kidney volume: median ~0.12 l, log SD 0.18 | length ~11 cm, SD 0.8-1 cm (volume CV ~20 %) |
  Emamian et al. 1993, AJR 160:83;
* pancreas volume: median ~70 ml, log SD 0.25 | ~70-80 ml, SD ~25-30 % | Saisho et al. 2007,
  Clin Anat 20:933;
* stomach filling: median ~0.27 l, log SD 0.50 | fasting (< 0.1 l) to after an oral
  water/contrast drink (0.5-1 l) | assumed from clinical CT protocols;
* gallbladder filling: median ~30 ml, log SD 0.45 | fasting-dependent, ~10-60 ml | assumed;
* organ shape and rotation: log SD 0.07 per semi-axis; rotation SD 6 deg (kidneys), 8 (spleen),
  5 (liver) per axis | assumed;
* other positions: N(0, 6) mm per axis plus the smooth displacement field | assumed (as before);
* subcutaneous fat: median 25 mm, log SD 0.5, clipped to 8-70 mm | ~1-5 cm at the abdominal
  wall | assumed, consistent with the waist spread below;
* body size: skeletal frame SD 6 %, visceral cavity x (fat / 25 mm)^0.1: body width CV ~0.12 |
  waist circumference of US adults ~100 cm, SD ~15 cm (CV ~0.15) | Fryar et al. 2012, Vital
  Health Stat 11(252);
* scan extent: bottom -300..-268 mm (below the symphysis, so the pelvic organs stay in view),
  top 15-105 mm above the liver dome: 40-54 cm | Synapse/BTCV scans have 85-198 slices of
  2.5-5 mm; abdominal CT starts at or above the diaphragm | Landman et al. 2015, MICCAI
  Multi-Atlas Labeling Beyond the Cranial Vault workshop.

The imbalance stays natural: over 40 cases the liver is ~48 % of the organ voxels (AMOS
layout), each adrenal gland ~0.15 %.

What it does not model
----------------------
Real anatomy and pathology (tumours, cysts, stones), organ shape detail (liver segments,
lobulated pancreas, kidney hilum and collecting system, adrenal Y shape), intrahepatic vessels,
bowel anatomy (loops are a random texture, not tubes), contrast excretion into the urinary
tract, oral contrast, streak/beam-hardening/motion artefacts, MRI, oblique (rotated) acquisition
planes, and scanner-specific noise texture. Nothing in it was tuned to favour any method: the
parameters are nominal anatomy/physics values fixed before any training was run.

Determinism: case ``i`` depends only on ``(seed, i)`` and the grid arguments (not on ``cases``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg_dpl.data.labels import AMOS_CLASSES, SYNAPSE_CLASSES
from medseg_dpl.errors import MedsegError
from medseg_dpl.utils import atomic_path

__all__ = ["PhantomError", "PhantomCase", "phantom_case", "make_phantom", "LAYOUTS",
           "DEFAULT_SHAPE"]

LAYOUTS = ("synapse", "amos")
DEFAULT_SHAPE = (80, 80, 64)
PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")

# Names used internally for structures; the layouts map the labelled ones to class indices.
# The IVC is "inferior_vena_cava" in Synapse and "postcava" in AMOS.
_ALIASES = {"postcava": "inferior_vena_cava"}


class PhantomError(MedsegError, ValueError):
    """Bad arguments to the phantom generator (the message says which and why)."""


def _layout_classes(layout: str) -> dict[str, int]:
    classes = SYNAPSE_CLASSES if layout == "synapse" else AMOS_CLASSES
    return {_ALIASES.get(n, n): i for i, n in enumerate(classes) if i > 0}


# --------------------------------------------------------------------------------------------
# geometry primitives: each returns a "normalised radius" field r (< 1 inside) on given coords
# --------------------------------------------------------------------------------------------

def _rot(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (degrees about x, then y, then z)."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


@dataclass
class _Ellipsoid:
    center: np.ndarray
    semi: np.ndarray
    R: np.ndarray = field(default_factory=lambda: np.eye(3))

    def bbox(self):
        ext = np.abs(self.R) @ self.semi  # axis-aligned half extent of the rotated ellipsoid
        return self.center - ext, self.center + ext

    def radius(self, q: np.ndarray) -> np.ndarray:
        """q: (3, ...) coordinates -> r (...)."""
        shp = (3,) + (1,) * (q.ndim - 1)
        d = q - self.center.astype(q.dtype).reshape(shp)
        # rows of R^T scaled by 1/semi: one small matmul instead of rotate-then-divide
        M = (self.R.T / self.semi[:, None]).astype(q.dtype)
        local = np.tensordot(M, d, axes=1)
        return np.sqrt(np.einsum("i...,i...->...", local, local))


@dataclass
class _Tube:
    points: np.ndarray   # (K, 3) control points
    radii: np.ndarray    # (K,) radius at each control point (mm)
    flatten: np.ndarray = field(default_factory=lambda: np.ones(3))  # per-axis scale (oval tubes)

    def __post_init__(self):
        # dense piecewise-linear sampling (~0.7 mm) so the nearest sample approximates the
        # distance to the centre line well below a voxel
        pts, rad = [], []
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            n = max(2, int(np.ceil(np.linalg.norm(b - a) / 0.7)))
            t = np.linspace(0, 1, n, endpoint=False)[:, None]
            pts.append(a + t * (b - a))
            rad.append(ra + t[:, 0] * (rb - ra))
        pts.append(self.points[-1:])
        rad.append(self.radii[-1:])
        self._pts = np.concatenate(pts)
        self._rad = np.concatenate(rad)
        self._tree = cKDTree(self._pts / self.flatten)

    def bbox(self):
        r = self.radii.max() * self.flatten
        return self._pts.min(0) - r, self._pts.max(0) + r

    def radius(self, q: np.ndarray) -> np.ndarray:
        flat = (q.reshape(3, -1).T / self.flatten)
        d, idx = self._tree.query(flat, k=1)
        return (d / self._rad[idx]).reshape(q.shape[1:])


@dataclass
class _Union:
    parts: list

    def bbox(self):
        los, his = zip(*(p.bbox() for p in self.parts))
        return np.min(los, 0), np.max(his, 0)

    def radius(self, q):
        return np.minimum.reduce([p.radius(q) for p in self.parts])


@dataclass
class _Structure:
    name: str
    shape: object                     # _Ellipsoid / _Tube / _Union / None (custom mask)
    hu: Callable                      # (r, q, rng) -> HU values for the voxels it owns
    within_cavity: bool = True        # clip to the abdominal/thoracic cavity
    center: np.ndarray | None = None  # for the presence guarantee
    mask_fn: Callable | None = None   # custom (q) -> bool mask, instead of shape.radius < 1


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------

@dataclass
class PhantomCase:
    """One generated case. ``image``: (X, Y, Z) int16 HU; ``label``: (X, Y, Z) uint8 class
    indices of ``layout``; ``affine``: 4x4 voxel -> RAS world (mm); ``info``: the per-case
    draws (phase, orientation, spacing, sex, ...)."""
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict


def _smooth_field(rng, shape, coarse=6):
    """Zero-mean, unit-std smooth random field of ``shape``: white noise on a half-resolution
    grid, Gaussian-filtered (correlation length ~``coarse`` voxels), linearly upsampled."""
    half = tuple(max(2, (s + 1) // 2) for s in shape)
    small = ndimage.gaussian_filter(rng.standard_normal(half).astype(np.float32), coarse / 2,
                                    mode="wrap", truncate=2.5)
    f = ndimage.zoom(small, [s / h for s, h in zip(shape, half)], order=1, mode="nearest",
                     grid_mode=True)[: shape[0], : shape[1], : shape[2]]
    f = f - f.mean()
    return (f / (f.std() + 1e-6)).astype(np.float32)


# Per-case anatomy variation (magnitudes and sources: the module docstring's table).
_CAVITY_SEMI = (127.5, 79.5)   # nominal visceral-cavity semi-axes (mm): organ positions scale with it
_VOLUME_LOG_SD = {             # SD of log(volume): CV ~= this for small values
    "default": 0.15, "liver": 0.20, "liver_left_lobe": 0.30, "spleen": 0.27, "kidney": 0.18,
    "pancreas": 0.25, "stomach": 0.50, "gallbladder": 0.45,
}
_SHAPE_LOG_SD = 0.07           # per-axis log SD on top (aspect ratio varies: shape, not just size)
_ROTATION_SD_DEG = {"kidney": 6.0, "spleen": 8.0, "liver": 5.0}
_DOME_Z = 135.0                # nominal liver dome height in the patient frame (mm)


def _draw_variation(rng: np.random.Generator) -> dict:
    """Draw one patient's habitus, organ levels and scan extent (mm; patient frame, +z superior).

    Returns ``fat_mm``, ``wall_mm`` (subcutaneous fat and muscle wall thickness),
    ``cavity_semi_mm`` (visceral cavity semi-axes x, y), ``upper_abdomen_shift_mm`` (liver
    dome, spleen, stomach, pancreas, kidneys, heart and lung bases against the spine: vertebral
    level and breath-hold depth), ``kidney_shift_mm`` (extra common kidney level),
    ``kidney_right_below_left_mm``, ``scan_bottom_mm`` and ``scan_top_mm`` (field of view).
    """
    frame = np.exp(rng.normal(0, 0.06))                       # skeletal frame size
    fat = float(np.clip(25.0 * np.exp(rng.normal(0, 0.5)), 8, 70))
    visceral = (fat / 25.0) ** 0.1                            # adiposity also widens the cavity
    cav = (_CAVITY_SEMI[0] * frame * visceral * np.exp(rng.normal(0, 0.03)),
           _CAVITY_SEMI[1] * frame * visceral * np.exp(rng.normal(0, 0.05)))
    dz = float(np.clip(rng.normal(0, 15), -40, 40))
    return {
        "fat_mm": fat,
        "wall_mm": float(rng.uniform(8, 13)),
        "cavity_semi_mm": tuple(float(c) for c in cav),
        "upper_abdomen_shift_mm": dz,
        "kidney_shift_mm": float(np.clip(rng.normal(0, 10), -30, 30)),
        "kidney_right_below_left_mm": float(rng.normal(16, 7)),
        # abdomen(-pelvis) scans: from a little (1.5 cm) to a lot (10 cm) above the liver dome,
        # down past the pubic symphysis, so every labelled organ of both layouts is in view
        "scan_bottom_mm": float(rng.uniform(-300, -268)),
        "scan_top_mm": float(_DOME_Z + dz + rng.uniform(15, 105)),
    }


def _phase_table(phase: str) -> dict[str, float]:
    """Nominal mean HU per tissue for a contrast phase (literature-typical values)."""
    nc, art, pv, de = (phase == p for p in PHASES)
    pick = lambda a, b, c, d: a if nc else b if art else c if pv else d  # noqa: E731
    return {
        "artery": pick(42, 280, 160, 110),
        "vein_ivc": pick(40, 80, 140, 110),     # infrarenal IVC mixes late in arterial phase
        "vein_portal": pick(40, 120, 175, 110),
        "liver": pick(58, 72, 110, 85),
        "spleen": pick(48, 105, 118, 88),
        "pancreas": pick(42, 110, 95, 72),
        "kidney_cortex": pick(32, 185, 165, 135),
        "kidney_medulla": pick(30, 60, 150, 140),
        "adrenal": pick(28, 55, 60, 45),
        "gallbladder": 10.0,
        "gi_wall": pick(40, 75, 85, 65),
        "muscle": pick(50, 58, 62, 58),
        "prostate": pick(40, 65, 75, 65),
        "uterus": pick(45, 100, 120, 90),
        "bladder": 8.0,
        "myocardium": pick(45, 110, 110, 85),
    }


def phantom_case(seed: int, index: int, layout: str = "synapse",
                 shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] | None = None) -> PhantomCase:
    """Generate case ``index`` of the phantom with ``seed`` (deterministic in (seed, index))."""
    if layout not in LAYOUTS:
        raise PhantomError(f"unknown phantom layout {layout!r}; known: {', '.join(LAYOUTS)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise PhantomError(f"phantom shape must be 3 sizes >= 8, got {shape}")
    rng = np.random.default_rng([int(seed), int(index)])
    U = rng.uniform

    # ---- body habitus, organ levels and scan extent (table "Per-case variation") ---------
    va = _draw_variation(rng)
    fat, wall, dz = va["fat_mm"], va["wall_mm"], va["upper_abdomen_shift_mm"]
    cav_ax, cav_ay = va["cavity_semi_mm"]
    body_ax, body_ay = cav_ax + fat + wall, cav_ay + fat + wall   # body semi-axes (mm)
    z_bottom = va["scan_bottom_mm"]
    if spacing is None:
        sxy = max(U(0.7, 1.0) * 512 / shape[0], (2 * body_ax + 30) / shape[0],
                  (2 * body_ay + 30) / shape[1])
        sxy = round(sxy, 4)
        fov_z = va["scan_top_mm"] - z_bottom
        spacing_ = np.array([sxy, sxy, round(fov_z / shape[2], 4)])
    else:
        spacing_ = np.asarray(spacing, float)
        if spacing_.shape != (3,) or np.any(spacing_ <= 0):
            raise PhantomError(f"phantom spacing must be 3 positive numbers, got {spacing}")
    fov = spacing_ * np.array(shape)
    center_patient = np.array([U(-10, 10), U(-8, 8), z_bottom + fov[2] / 2])
    orientation = str(rng.choice(["RAS", "LPS", "LAS"], p=[0.4, 0.4, 0.2]))
    signs = np.array([1 if c == r else -1 for c, r in zip(orientation, "RAS")], float)
    table = np.array([U(-30, 30), U(-250, -120), U(-700, -100)])  # scanner origin offset (mm)
    Mdiag = signs * spacing_
    half = (np.array(shape) - 1) / 2
    origin_world = (center_patient + table) - Mdiag * half
    affine = np.eye(4)
    affine[:3, :3] = np.diag(Mdiag)
    affine[:3, 3] = origin_world

    # patient coordinates of the voxel centres (separable: axis-aligned affine)
    axes = [Mdiag[a] * np.arange(shape[a]) + origin_world[a] - table[a] for a in range(3)]
    P = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)   # (3, X, Y, Z)

    # smooth low-frequency displacement (sum of random sinusoids, wavelengths 150-400 mm)
    D = np.zeros_like(P)
    dmax = 0.0
    for c in range(3):
        for _ in range(3):
            k = rng.standard_normal(3)
            k *= 2 * np.pi / U(150, 400) / np.linalg.norm(k)
            amp = U(1.5, 3.0)
            dmax += amp
            D[c] += amp * np.sin(k[0] * P[0] + k[1] * P[1] + k[2] * P[2] + U(0, 2 * np.pi))
    Q = P + D                       # organs are defined in Q (deformed patient space)
    margin = dmax + 1.0

    # ---- per-case anatomy draws ----------------------------------------------------------
    # organ positions scale with the visceral cavity (not with subcutaneous fat)
    sx_, sy_ = cav_ax / _CAVITY_SEMI[0], cav_ay / _CAVITY_SEMI[1]
    jit = lambda s=6.0: rng.normal(0, s, 3)              # noqa: E731
    sd = _VOLUME_LOG_SD

    def vol(s=sd["default"]):
        """Semi-axis factors (3,): log-normal volume (log SD ``s``) times a per-axis shape term."""
        return np.exp(rng.normal(0, s)) ** (1 / 3) * np.exp(rng.normal(0, _SHAPE_LOG_SD, 3))

    pos = lambda x, y, z, s=6.0: np.array([x * sx_, y * sy_, z + dz]) + jit(s)  # noqa: E731
    ys = -cav_ay + 42 + U(-4, 4)                         # vertebral body centre (y)
    male = bool(rng.random() < 0.5)
    phase = str(rng.choice(PHASES, p=[0.15, 0.2, 0.5, 0.15]))
    hu = {k: v + rng.normal(0, 7) for k, v in _phase_table(phase).items()}
    gastric_content = U(0, 45)                           # fluid .. food
    gastric_air = U(0.25, 0.8)                           # fraction of the radius that is air
    bladder_fill = np.exp(rng.normal(0, 0.35))

    tex = _smooth_field(rng, shape, coarse=5)            # organ texture
    bowel_field = _smooth_field(rng, shape, coarse=4)    # bowel vs. visceral fat pattern
    gas_field = _smooth_field(rng, shape, coarse=3)

    def flat(v):
        return lambda r, q, idx: np.full(r.shape, v, np.float32)

    def textured(v, amp):
        return lambda r, q, idx: v + amp * tex[idx]

    def kidney_hu(r, q, idx):
        return np.where(r > 0.68, hu["kidney_cortex"], hu["kidney_medulla"]) + 6 * tex[idx]

    def hollow(center_y, wall_hu, content, air_frac):
        # gas rises anteriorly (patient supine): the anterior part of the lumen is air
        def f(r, q, idx):
            out = np.where(r > 0.8, wall_hu, content + 8 * tex[idx])
            air = (r <= 0.8) & (q[1] > center_y + (1 - 2 * air_frac) * 20)
            return np.where(air, -850.0, out)
        return f

    S: list[_Structure] = []
    add = S.append

    # bones and muscles first: organs never intrude into them
    vb_c = np.array([0.0, ys])

    def spine_mask(q):
        rxy = np.hypot(q[0] - vb_c[0], q[1] - vb_c[1])
        body = rxy < 17
        canal = np.hypot(q[0], q[1] - (ys - 24)) < 8
        post = (np.abs(q[0]) < 14) & (q[1] < ys - 14) & (q[1] > ys - 48)
        return body | canal | post

    def spine_hu(r, q, idx):
        rxy = np.hypot(q[0] - vb_c[0], q[1] - vb_c[1])
        disc = (np.mod(q[2] + 7, 32) < 8) & (rxy < 17)
        out = np.where(rxy > 14, 650.0, 230.0)
        out = np.where(disc, 85.0, out)
        out = np.where(np.hypot(q[0], q[1] - (ys - 24)) < 8, 22.0, out)
        return np.where((rxy >= 17) & (np.hypot(q[0], q[1] - (ys - 24)) >= 8), 520.0, out)

    add(_Structure("spine", None, spine_hu, within_cavity=False, mask_fn=spine_mask))
    for side in (1, -1):
        add(_Structure("paraspinal", _Ellipsoid(np.array([side * 38, ys - 38, 0.0]),
                                                np.array([26, 22, 400.0])),
                       textured(hu["muscle"], 4), within_cavity=False))
        add(_Structure("psoas", _Tube(np.array([[side * 24, ys + 5, 60], [side * 34, ys + 6, -20],
                                                [side * 52, ys + 14, -130], [side * 62, ys + 28, -230]]),
                                      np.array([6, 14, 22, 20.0])),
                       textured(hu["muscle"], 4)))
        add(_Structure("iliac_bone", _Ellipsoid(np.array([side * 100 * sx_, ys + 10, -165]),
                                                np.array([13, 48, 55.0]), _rot(0, 0, side * 25)),
                       flat(480.0), within_cavity=False))
        add(_Structure("femoral_head", _Ellipsoid(np.array([side * 88 * sx_, ys + 60, -262]),
                                                  np.array([24, 24, 24.0])),
                       flat(420.0), within_cavity=False))

    # vessels
    z_bif = -100 + U(-12, 12)
    ao_r = U(10, 13)
    ao = np.array([-16 + U(-4, 4), ys + 28])
    add(_Structure("aorta", _Tube(np.array([[ao[0] - 4, ao[1] - 2, 260], [ao[0], ao[1], 60],
                                            [ao[0] + 3, ao[1] + 2, z_bif]]),
                                  np.array([ao_r + 1, ao_r, ao_r * 0.85])),
                   textured(hu["artery"], 5)))
    ivc = np.array([21 + U(-4, 4), ys + 24])
    ivc_r = U(10, 12.5)
    add(_Structure("inferior_vena_cava",
                   _Tube(np.array([[ivc[0] + 4, ivc[1], z_bif - 8], [ivc[0], ivc[1], 20 + dz],
                                   [ivc[0] - 4, ivc[1] + 22, 110 + dz], [6, ivc[1] + 40, 200]]),
                         np.array([ivc_r, ivc_r, ivc_r * 1.1, 14]), np.array([1.25, 0.8, 1.0])),
                   textured(hu["vein_ivc"], 5)))
    for side in (1, -1):
        add(_Structure("iliac_artery", _Tube(np.array([[ao[0] + 3, ao[1] + 2, z_bif + 5],
                                                       [side * 55, ys + 30, -200], [side * 70, ys + 45, -260]]),
                                             np.array([7, 6, 5.0])), flat(hu["artery"])))
        add(_Structure("iliac_vein", _Tube(np.array([[ivc[0] + 4, ivc[1], z_bif - 5],
                                                     [side * 48, ys + 20, -200], [side * 66, ys + 38, -260]]),
                                           np.array([8, 7, 6.0])), flat(hu["vein_ivc"])))
    conf = pos(4, ys / sy_ + 70, 12, 3)                   # splenoportal confluence
    hil_l = pos(48, 30, 42, 4)                            # liver hilum
    spl_c = pos(-92, -28, 68, 5)                          # spleen centre
    add(_Structure("portal_splenic_veins", _Union([
        _Tube(np.array([conf, hil_l, hil_l + [18, 5, 12]]), np.array([7, 7, 5.0])),
        _Tube(np.array([conf, conf + [-38, -8, 10], spl_c + [18, 20, -15]]), np.array([5, 4.5, 4.0])),
        _Tube(np.array([conf, conf + [2, 4, -70]]), np.array([5.5, 4.5])),
    ]), textured(hu["vein_portal"], 5), center=conf))

    # small organs
    # kidney level: a common retroperitoneal shift plus a right-below-left offset (mean 16 mm)
    kz, k_rl = va["kidney_shift_mm"], va["kidney_right_below_left_mm"]
    kr_c = pos(70, ys / sy_ + 14, -4 + kz - k_rl / 2)
    kl_c = pos(-70, ys / sy_ + 14, -4 + kz + k_rl / 2)
    rot_sd = _ROTATION_SD_DEG
    k_semi = np.array([26, 21, 54.0])
    add(_Structure("right_adrenal_gland",
                   _Ellipsoid(kr_c + [-30, 8, 60], np.array([5.5, 13, 17]) * vol(0.2), _rot(0, 10, 35)),
                   textured(hu["adrenal"], 5)))
    add(_Structure("left_adrenal_gland",
                   _Ellipsoid(kl_c + [-30 * -1, 14, 50], np.array([5.5, 13, 17]) * vol(0.2), _rot(0, -10, -35)),
                   textured(hu["adrenal"], 5)))
    gb_c = pos(56, 46, 18, 7)
    add(_Structure("gallbladder", _Ellipsoid(gb_c, np.array([15, 15, 31]) * vol(sd["gallbladder"]),
                                             _rot(U(20, 40), U(-15, 15), 0)),
                   flat(hu["gallbladder"])))
    add(_Structure("esophagus",
                   _Tube(np.array([[-2, ys + 46, 260], [-8, ys + 52, 140 + dz], [-24, ys + 62, 95 + dz],
                                   pos(-42, 28, 80, 3)]), np.array([7.5, 8, 8, 9.0])),
                   hollow(ys + 50, hu["gi_wall"], 20.0, U(0, 0.4))))

    # parenchymal organs
    for name, c, side in (("right_kidney", kr_c, 1), ("left_kidney", kl_c, -1)):
        rot = _rot(*(np.array([0, -12 * side, -25 * side]) + rng.normal(0, rot_sd["kidney"], 3)))
        add(_Structure(name, _Ellipsoid(c, k_semi * vol(sd["kidney"]), rot), kidney_hu))
    pv = vol(sd["pancreas"])
    pan = np.array([pos(30, ys / sy_ + 68, -2, 3), conf + [0, 10, 2], conf + [-40, 8, 14],
                    spl_c + [20, 24, -22]])
    add(_Structure("pancreas", _Tube(pan, np.array([17, 12.5, 11.5, 9.5]) * pv[0]),
                   textured(hu["pancreas"], 8)))
    duo_air = U(0, 0.5)
    duo = np.array([pos(22, 46, 30), pos(52, 22, 22), pos(56, 12, -22),
                    pos(20, ys / sy_ + 62, -42), pos(-22, ys / sy_ + 66, -36), pos(-32, ys / sy_ + 74, -12)])
    add(_Structure("duodenum", _Tube(duo, np.full(6, 11.5) * vol(0.15)[0]),
                   hollow(10, hu["gi_wall"], U(0, 30), duo_air)))
    add(_Structure("spleen", _Ellipsoid(spl_c, np.array([23, 56, 45]) * vol(sd["spleen"]),
                                        _rot(*(np.array([0, 0, 32.0]) + rng.normal(0, rot_sd["spleen"], 3)))),
                   textured(hu["spleen"], 9 if phase == "arterial" else 4)))
    st_v = vol(sd["stomach"])                           # filling: fasting .. after a drink
    st_f = pos(-52, 14, 88)
    stomach = _Union([
        _Ellipsoid(st_f, np.array([34, 32, 34]) * st_v),
        _Tube(np.array([st_f + [-4, 8, -10], pos(-52, 44, 48), pos(-22, 56, 28), pos(12, 48, 28)]),
              np.array([27, 23, 19, 13.0]) * st_v[0]),
    ])
    add(_Structure("stomach", stomach, hollow(st_f[1], hu["gi_wall"], gastric_content, gastric_air),
                   center=st_f))
    bl_c = np.array([0, 40 * sy_, -198]) + jit(5)
    add(_Structure("bladder", _Ellipsoid(bl_c, np.array([44, 36, 31]) * bladder_fill ** (1 / 3) * vol(0.05)),
                   flat(hu["bladder"])))
    if male:
        add(_Structure("prostate_uterus", _Ellipsoid(np.array([0, 14 * sy_, -246]) + jit(3),
                                                     np.array([21, 16, 17]) * vol(0.2)),
                       textured(hu["prostate"], 5)))
    else:
        add(_Structure("prostate_uterus", _Ellipsoid(bl_c + [U(-10, 10), -36, 24],
                                                     np.array([27, 20, 40]) * vol(0.25), _rot(-25, 0, 0)),
                       textured(hu["uterus"], 6)))
    rectum = _Tube(np.array([[0, ys + 2, -140], [0, ys + 14, -200], [0, ys + 36, -275]]),
                   np.array([15, 17, 14.0]))
    lv = vol(sd["liver"])
    left_lobe = lv * np.exp(rng.normal(0, sd["liver_left_lobe"])) ** (1 / 3)   # its share varies too
    add(_Structure("liver", _Union([
        _Ellipsoid(pos(66, 4, 58, 5), np.array([72, 80, 70]) * lv,
                   _rot(*rng.normal(0, rot_sd["liver"], 3))),
        _Ellipsoid(pos(-14, 40, 78, 5), np.array([56, 30, 36]) * left_lobe, _rot(0, -12, 15)),
    ]), textured(hu["liver"], 4)))
    add(_Structure("rectum", rectum, hollow(ys + 14, hu["gi_wall"], -200.0, 0.3)))
    # thoracic content: heart, lung bases (they fill around the liver dome)
    add(_Structure("heart", _Ellipsoid(np.array([-18, 38 * sy_, 190 + dz]), np.array([58, 46, 44])),
                   lambda r, q, idx: np.where(r > 0.75, hu["myocardium"], hu["artery"] * 0.5 + hu["vein_ivc"] * 0.5)))
    for side in (1, -1):
        add(_Structure("lung", _Ellipsoid(np.array([side * 76 * sx_, -8, 210 + dz]),
                                          np.array([62 * sx_, 88 * sy_, 105])),
                       lambda r, q, idx: -860 + 25 * tex[idx]))

    # ---- rasterise with the priority order --------------------------------------------------
    X, Y, Z = shape
    owner = np.full(shape, -1, np.int16)
    rel = np.zeros(shape, np.float32)
    body_r = np.hypot(Q[0] / body_ax, Q[1] / body_ay)
    cavity = np.hypot(Q[0] / cav_ax, Q[1] / cav_ay) < 1
    body = body_r < 1
    for si, st in enumerate(S):
        if st.shape is not None:
            lo, hi = st.shape.bbox()
        else:
            lo, hi = np.array([-60, ys - 60, -1e4]), np.array([60, ys + 30, 1e4])
        sl = []
        for a in range(3):
            inside = np.nonzero((axes[a] >= lo[a] - margin) & (axes[a] <= hi[a] + margin))[0]
            if inside.size == 0:
                break
            sl.append(slice(inside.min(), inside.max() + 1))
        if len(sl) < 3:
            continue
        sl = tuple(sl)
        q = Q[(slice(None),) + sl]
        if st.mask_fn is not None:
            m = st.mask_fn(q)
            r = np.zeros(m.shape, np.float32)
        else:
            r = st.shape.radius(q)
            m = r < 1
        m &= owner[sl] < 0
        m &= cavity[sl] if st.within_cavity else body[sl]
        owner[sl][m] = si
        rel[sl][m] = r[m]

    # presence guarantee for the labelled organs of this layout
    cls = _layout_classes(layout)
    names = [s.name for s in S]
    forced = []
    for name in cls:
        si = names.index(name)
        if np.any(owner == si):
            continue
        st = S[si]
        c = st.center if st.center is not None else (
            st.shape.center if isinstance(st.shape, _Ellipsoid) else st.shape.bbox()[0] / 2 + st.shape.bbox()[1] / 2)
        ijk = np.clip(np.round((c + table - origin_world) / Mdiag).astype(int), 0, np.array(shape) - 1)
        nb = tuple(slice(max(0, v - 1), v + 2) for v in ijk)
        claim = owner[nb] < 0
        claim[tuple(ijk - [s.start for s in nb])] = True
        owner[nb][claim] = si
        forced.append(name)

    # ---- intensities ------------------------------------------------------------------------
    img = np.full(shape, -1000.0, np.float32)
    # subcutaneous fat, muscle wall, visceral fat with bowel loops and gas
    img[body] = -100 + 12 * tex[body]
    wall_m = body & ~cavity & (body_r > 0) & (np.hypot(Q[0] / (cav_ax + wall), Q[1] / (cav_ay + wall)) < 1)
    img[wall_m] = hu["muscle"] + 5 * tex[wall_m]
    # lower ribs in the muscle wall / fat border, every ~28 mm, above the iliac crests
    rib = (body & ~cavity & (np.abs(np.hypot(Q[0] / (cav_ax + wall + 4), Q[1] / (cav_ay + wall + 4)) - 1) < 0.045)
           & (np.mod(Q[2] + 10, 28) < 10) & (Q[2] > 5 + dz) & (Q[1] < 0.55 * body_ay))
    img[rib] = 550.0
    visc = cavity & (owner < 0)
    bw = bowel_field[visc]
    gas = gas_field[visc]
    img[visc] = np.where(bw > 0.15, np.where(gas > 1.4, -700.0, hu["gi_wall"] - 10 + 15 * gas), -95 + 10 * bw)
    for si, st in enumerate(S):
        m = owner == si
        if not m.any():
            continue
        idx = np.nonzero(m)
        img[idx] = st.hu(rel[idx], Q[(slice(None),) + idx], idx)

    # acquisition: noise, then a slight blur (correlated noise, partial-volume edges)
    noise_sd = U(18, 45)
    img += rng.normal(0, noise_sd, shape).astype(np.float32)
    blur = U(0.5, 0.8)
    img = ndimage.gaussian_filter(img, blur, mode="nearest")
    image = np.clip(np.round(img), -1024, 3071).astype(np.int16)

    lut = np.zeros(len(S) + 1, np.uint8)       # index 0 <- owner -1 (nobody)
    for name, k in cls.items():
        lut[names.index(name) + 1] = k
    label = lut[owner.astype(np.int64) + 1]

    info = {"seed": int(seed), "index": int(index), "layout": layout, "phase": phase,
            "orientation": orientation, "spacing": [float(s) for s in spacing_],
            "shape": list(shape), "sex": "M" if male else "F", "noise_sd_hu": round(float(noise_sd), 2),
            "forced_organs": forced,
            "anatomy": {k: (round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v])
                        for k, v in va.items()}}
    return PhantomCase(image=image, label=label, affine=affine, info=info)


# --------------------------------------------------------------------------------------------
# writing the raw layouts
# --------------------------------------------------------------------------------------------

def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)   # scanner coordinates, as DICOM converters write them
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def make_phantom(out_dir: str | os.PathLike, layout: str = "synapse", cases: int = 8, seed: int = 0,
                 shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] | None = None,
                 va_fraction: float = 0.25, progress: bool = False) -> list[Path]:
    """Write ``cases`` phantom cases to ``out_dir`` in the raw ``layout`` and return the paths
    written (images, labels, and for AMOS the ``dataset.json``, in that order per case).

    ``shape``: (X, Y, Z) voxels of every case. ``spacing``: fixed (sx, sy, sz) mm, or None for
    per-case random anisotropic spacing that fits the body. ``va_fraction`` (AMOS only): share
    of the cases (the last ones) written to ``imagesVa``/``labelsVa``.
    """
    if layout not in LAYOUTS:
        raise PhantomError(f"unknown phantom layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if int(cases) < 1:
        raise PhantomError(f"phantom needs at least 1 case, got {cases}")
    if not 0 <= va_fraction < 1:
        raise PhantomError(f"va_fraction must be in [0, 1), got {va_fraction}")
    cases = int(cases)
    out = Path(out_dir)
    n_va = int(round(cases * va_fraction)) if layout == "amos" else 0
    if layout == "amos" and cases >= 2:
        n_va = min(max(n_va, 1 if va_fraction > 0 else 0), cases - 1)
    written: list[Path] = []
    training, validation = [], []
    it = range(cases)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"phantom ({layout})", unit="case")
    for i in it:
        case = phantom_case(seed, i, layout=layout, shape=shape, spacing=spacing)
        num = i + 1
        if layout == "synapse":
            img_p = out / "RawData" / "Training" / "img" / f"img{num:04d}.nii.gz"
            lab_p = out / "RawData" / "Training" / "label" / f"label{num:04d}.nii.gz"
        else:
            sub = "Va" if i >= cases - n_va else "Tr"
            img_p = out / f"images{sub}" / f"amos_{num:04d}.nii.gz"
            lab_p = out / f"labels{sub}" / f"amos_{num:04d}.nii.gz"
            entry = {"image": f"./images{sub}/{img_p.name}", "label": f"./labels{sub}/{lab_p.name}"}
            (validation if sub == "Va" else training).append(entry)
        _save(case.image, case.affine, img_p)
        _save(case.label, case.affine, lab_p)
        written += [img_p, lab_p]
    if layout == "amos":
        meta = {
            "name": "AMOS",
            "description": "synthetic abdomen phantom in the AMOS22 layout (medseg_dpl.data.phantom)",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(i): n for i, n in enumerate(AMOS_CLASSES)},
            "numTraining": len(training),
            "numValidation": len(validation),
            "numTest": 0,
            "training": training,
            "validation": validation,
            "test": [],
        }
        p = out / "dataset.json"
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        written.append(p)
    return written
