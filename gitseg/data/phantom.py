"""The realistic phantom (issue 32): abdominal anatomy built in 3D, hard in the ways the real scans are.

- **Anatomy**: a body outline with subcutaneous fat and a muscle wall, spine and paraspinal
  muscles, liver, spleen and kidneys as distractors; the large bowel as a tube along the colon's
  frame (caecum, ascending, transverse, descending, sigmoid) with a varying radius, haustral folds
  and contents (fluid, air, stool); the small bowel as several long self-avoiding tubes packed
  into the space the frame encloses, which an axial slice cuts into many small sections; the
  stomach as a lobed sac high on the patient's left with a fluid level and an air cap. Every
  organ has a wall and a lumen; its mask is the outer wall, as annotators draw it.
- **Patients and days**: each case draws its own body, organ positions and bowel loops; each scan
  day of a case is the same anatomy under a smooth displacement, with other filling, peristaltic
  narrowing and a shifted slice range.
- **MRI contrast**: per case-day tissue intensities drawn so that neighbours overlap (bowel wall
  and muscle, bowel fluid and fat), a smooth multiplicative bias field, partial-volume blur across
  the 3 mm slices, breathing blur on some slices, Rician noise over a range of SNRs and the real
  data's spread of intensity scales.

Coordinates as in synth.py: x in mm toward the patient's left (the image's right), y in mm toward
the back, z as a fraction of the scan from its head end. `render_scan` returns what synth.py's
does: an image uint16 `(D, H, W)` and masks bool `(3, D, H, W)` in CLASSES order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from gitseg.data.acquisition import bias_field, rician_uint16, smooth_noise
from gitseg.data.uwmgi import SLICE_THICKNESS_MM

# Each organ's slice range as fractions of the scan (before a case's jitter and a day's shift): the
# empty-slice share and per-class frequencies come out near the real data's (docs/DATA.md).
Z_RANGE = {"stomach": (0.205, 0.44), "large_bowel": (0.26, 0.65), "small_bowel": (0.37, 0.65)}
NOMINAL_Z_MM = 144 * SLICE_THICKNESS_MM   # the z extent the anatomy is planned in (scaled to the scan)
CONTENTS = ("fluid", "air", "stool")

# Tissue intensity (relative, before bias and scale): mean and spread of a case-day's draw. The
# spreads make neighbours overlap as in the real scans: bowel wall against muscle, bowel fluid
# against fat, stool against liver and spleen.
TISSUE = {
    "fat": (0.72, 0.07), "muscle": (0.30, 0.05), "liver": (0.40, 0.05), "spleen": (0.48, 0.06),
    "kidney": (0.55, 0.07), "marrow": (0.42, 0.06), "wall": (0.34, 0.05), "fluid": (0.80, 0.08),
    "air": (0.04, 0.02), "stool": (0.46, 0.08), "cavity": (0.36, 0.05),
}


# ---------------------------------------------------------------------------------------------
# A patient


def _self_avoiding_walk(rng, start, box_lo, box_hi, steps, step_mm, occupied: dict, cell_mm, name):
    """A persistent random walk in mm (z mm, y, x) inside the box. `occupied` maps coarse cells to
    (walk, step) of the point in them: a step may not enter a cell of another walk, nor one of its
    own path but the last few steps', so the tubes around the walks keep apart."""
    path = [np.asarray(start, float)]
    direction = rng.normal(0, 1, 3)
    direction /= np.linalg.norm(direction)
    for i in range(steps):
        for _attempt in range(16):
            turn = direction + rng.normal(0, 0.9, 3)
            turn /= np.linalg.norm(turn)
            point = path[-1] + step_mm * turn
            cell = tuple(np.floor(point / cell_mm).astype(int))
            owner = occupied.get(cell)
            if np.all(point >= box_lo) and np.all(point <= box_hi) and (owner is None or (owner[0] == name
                                                                                         and owner[1] >= i - 3)):
                break
        else:
            break  # boxed in: the loop ends here
        occupied.setdefault(cell, (name, i))
        path.append(point)
        direction = turn
    return np.array(path)


def sample_patient(rng: np.random.Generator) -> dict:
    """One case's anatomy, in mm (z in mm of a NOMINAL_Z_MM scan)."""
    ax, ay = rng.uniform(130, 175), rng.uniform(95, 130)
    z_range = {organ: tuple(np.clip(np.asarray(r) + rng.normal(0, 0.02, 2), 0.05, 0.92))
               for organ, r in Z_RANGE.items()}
    # Large bowel: the frame's control points (z fraction within its range, y, x) and a radius each.
    frame = np.array([[0.95, 35, -95], [0.55, 20, -105], [0.08, -15, -85], [0.02, -45, -10], [0.0, -40, 85],
                      [0.45, 5, 100], [0.92, 25, 90], [1.0, 45, 20]]) + rng.normal(0, [0.03, 6, 6], size=(8, 3))
    frame_radius = rng.uniform(13, 18) * rng.uniform(0.8, 1.25, size=len(frame))
    frame_radius[-2:] *= 0.8  # descending and sigmoid: narrower
    # Small bowel: long loops packed in the space the frame encloses, avoiding each other.
    lo_z, hi_z = (np.asarray(z_range["small_bowel"]) * NOMINAL_Z_MM)
    box_lo, box_hi = np.array([lo_z, -60, -85]), np.array([hi_z, 40, 85])
    occupied: dict = {}
    loops = []
    for n in range(int(rng.integers(6, 10))):
        start = rng.uniform(box_lo, box_hi)
        walk = _self_avoiding_walk(rng, start, box_lo, box_hi, int(rng.integers(60, 120)), 7.0, occupied, 11.0, n)
        if len(walk) >= 4:
            loops.append({"path": walk, "radius": rng.uniform(7.0, 10.5)})
    return {
        "body": (ax, ay), "fat": rng.uniform(8, 28), "muscle": rng.uniform(6, 12),
        "liver": (rng.uniform(-85, -55), rng.uniform(-20, 10), rng.uniform(72, 90), rng.uniform(58, 75)),
        "spleen": (rng.uniform(70, 90), rng.uniform(30, 50), rng.uniform(26, 34), rng.uniform(36, 46)),
        "kidney": (rng.uniform(55, 70), rng.uniform(35, 50), rng.uniform(24, 30), rng.uniform(30, 38)),
        "stomach": {"centre": (rng.uniform(45, 75), rng.uniform(-45, -20)),
                    "axes": (rng.uniform(35, 50), rng.uniform(28, 40)),
                    "harmonics": rng.uniform(0.05, 0.2, size=3), "phases": rng.uniform(0, 2 * np.pi, size=3)},
        "large_bowel": {"points": frame, "radius": frame_radius, "haustra_mm": rng.uniform(20, 30),
                        "haustra_depth": rng.uniform(0.10, 0.22)},
        "small_bowel": loops,
        "z_range": z_range,
        "z_shift": rng.uniform(-0.03, 0.03),
    }


def scan_day(patient: dict, rng: np.random.Generator, first: bool) -> dict:
    """What changes between a case's scan days: a smooth displacement, filling, peristalsis, the
    slice range. The first day keeps the anatomy as sampled."""
    amplitude = 0.0 if first else rng.uniform(3, 7)
    return {
        "shift": np.zeros(2) if first else rng.normal(0, 5, 2),
        "z_shift": patient["z_shift"] + (0.0 if first else rng.uniform(-0.02, 0.02)),
        # a displacement field: a few random plane waves (wavelengths of 8-20 cm), in mm
        "waves": [(rng.normal(0, 1, 3) / rng.uniform(80, 200), rng.uniform(0, 2 * np.pi), rng.normal(0, amplitude, 3))
                  for _ in range(3)],
        "stomach_fill": rng.uniform(0.8, 1.2), "fluid_level": rng.uniform(0.25, 0.75),
        "colon_fill": rng.uniform(0.88, 1.12),
        "narrowing": int(rng.integers(0, 4)),  # peristaltic narrowings of the small bowel
        "seed": int(rng.integers(2**31)),
    }


def _displace(points_mm: np.ndarray, day: dict) -> np.ndarray:
    """Points (z mm, y, x) moved by the day's smooth displacement and shift."""
    out = points_mm.astype(float).copy()
    for k, phase, amp in day["waves"]:
        out += np.sin(points_mm @ k + phase)[:, None] * amp
    out[:, 1:] += day["shift"]
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _tube(shape, spacing, centre_mm, radius_mm, labels, z_bounds):
    """A tube along samples `centre_mm` (z mm, y, x; each with its radius and an integer label):
    (outer mask, distance to the centreline in mm, label of the nearest sample), computed over the
    tube's bounding box, within the slices `z_bounds` (first, last + 1)."""
    d, h, w = shape
    idx = np.round(centre_mm / [SLICE_THICKNESS_MM, spacing, spacing] + [-0.5, (h - 1) / 2, (w - 1) / 2]).astype(int)
    keep = ((idx[:, 0] >= z_bounds[0]) & (idx[:, 0] < z_bounds[1]) & (idx[:, 1] >= 0) & (idx[:, 1] < h)
            & (idx[:, 2] >= 0) & (idx[:, 2] < w))
    mask = np.zeros(shape, bool)
    dist = np.full(shape, np.inf, np.float32)
    label = np.zeros(shape, np.int16)
    if not keep.any():
        return mask, dist, label
    idx, radius_mm, labels = idx[keep], radius_mm[keep], labels[keep]
    pad = np.ceil(radius_mm.max() / np.array([SLICE_THICKNESS_MM, spacing, spacing])).astype(int) + 1
    lo = np.maximum(idx.min(0) - pad, [z_bounds[0], 0, 0])
    hi = np.minimum(idx.max(0) + pad + 1, [z_bounds[1], h, w])
    seeds = np.ones(tuple(hi - lo), bool)
    local = idx - lo
    seeds[local[:, 0], local[:, 1], local[:, 2]] = False
    index_of = np.full(seeds.shape, -1, np.int64)
    index_of[local[:, 0], local[:, 1], local[:, 2]] = np.arange(len(local))
    box_dist, nearest = ndimage.distance_transform_edt(seeds, sampling=(SLICE_THICKNESS_MM, spacing, spacing),
                                                       return_indices=True)
    which = index_of[nearest[0], nearest[1], nearest[2]]
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    mask[box] = box_dist <= radius_mm[which]
    dist[box] = box_dist - radius_mm[which]  # < 0 inside: how far inside the outer wall
    label[box] = labels[which]
    return mask, dist, label


def _curve(points_mm: np.ndarray, step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense samples of a smooth curve through `points_mm`, and their arc length in mm."""
    t = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points_mm, axis=0), axis=1))])
    keep = np.concatenate([[True], np.diff(t) > 1e-6])
    spline = CubicSpline(t[keep], points_mm[keep], bc_type="natural")
    s = np.arange(0, t[-1], step_mm)
    return spline(s), s


def render_scan(patient: dict, day: dict, geo) -> tuple[np.ndarray, np.ndarray]:
    """One scan of `patient` on `day` with geometry `geo` (synth.ScanGeometry)."""
    rng = np.random.default_rng(day["seed"])
    d, h, w = geo.shape
    sp = geo.spacing
    z_mm_scan = d * SLICE_THICKNESS_MM
    zf = ((np.arange(d) + 0.5) / d)[:, None, None]
    y = ((np.arange(h) - (h - 1) / 2) * sp)[None, :, None]
    x = ((np.arange(w) - (w - 1) / 2) * sp)[None, None, :]
    shift = day["z_shift"]
    dy, dx = day["shift"]

    def z_profile(lo, hi):
        centre, half = (lo + hi) / 2 + shift, (hi - lo) / 2
        return np.sqrt(np.clip(1 - ((zf - centre) / half) ** 2, 0, None))

    def blob(cx, cy, rx, ry, lo, hi):
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((x - cx - dx) / rx) ** 2 + ((y - cy - dy) / ry) ** 2 < z_profile(lo, hi) ** 2

    ax, ay = patient["body"]
    wobble = 1 + 0.04 * np.sin(2 * np.pi * zf * 1.3 + ax)
    radial = np.sqrt((x / (ax * wobble)) ** 2 + (y / (ay * wobble)) ** 2)  # 1 at the skin
    body = radial < 1
    mean_axis = (ax + ay) / 2
    inside_fat = radial < 1 - patient["fat"] / mean_axis
    cavity = radial < 1 - (patient["fat"] + patient["muscle"]) / mean_axis

    def bounds(organ):
        lo, hi = patient["z_range"][organ]
        return max(0, int(np.ceil((lo + shift) * d))), min(d, int(np.floor((hi + shift) * d)))

    def to_scan_mm(points):  # (z fraction in the organ's range, y, x) -> (z mm of this scan, y, x)
        return np.column_stack([points[:, 0] * z_mm_scan, points[:, 1], points[:, 2]])

    # Large bowel: the frame, mapped into its slice range; radius with haustra; contents by segment.
    lb = patient["large_bowel"]
    lo, hi = patient["z_range"]["large_bowel"]
    pts = lb["points"].copy()
    pts[:, 0] = (lo + np.clip(pts[:, 0], 0, 1) * (hi - lo) + shift) * NOMINAL_Z_MM
    pts = _displace(pts, day)
    pts[:, 0] /= NOMINAL_Z_MM
    control_radius = lb["radius"] * day["colon_fill"]
    centre, s = _curve(to_scan_mm(pts), 0.4 * min(sp, SLICE_THICKNESS_MM))
    radius = np.interp(s, np.linspace(0, s[-1], len(control_radius)), control_radius)
    radius *= 1 - lb["haustra_depth"] * (0.5 + 0.5 * np.cos(2 * np.pi * s / lb["haustra_mm"])) * (s < 0.7 * s[-1])
    segments = np.cumsum(rng.uniform(30, 90, size=int(s[-1] / 30) + 2))
    contents = rng.choice(len(CONTENTS), size=len(segments) + 1, p=[0.45, 0.25, 0.30])[np.searchsorted(segments, s)]
    lb_mask, lb_dist, lb_label = _tube((d, h, w), sp, centre, radius, contents, bounds("large_bowel"))

    # Small bowel: each loop displaced, narrowed in places (peristalsis), fluid or air inside.
    sb_mask = np.zeros((d, h, w), bool)
    sb_dist = np.full((d, h, w), np.inf, np.float32)
    sb_label = np.zeros((d, h, w), np.int16)
    loops = patient["small_bowel"]
    narrowed = rng.choice(len(loops), size=min(day["narrowing"], len(loops)), replace=False) if loops else []
    narrow_loops = set(narrowed.tolist()) if len(narrowed) else set()
    for i, loop in enumerate(loops):
        path = _displace(loop["path"], day)
        path[:, 0] = (path[:, 0] / NOMINAL_Z_MM + shift) * z_mm_scan
        centre, s = _curve(path, 0.4 * min(sp, SLICE_THICKNESS_MM))
        radius = np.full(len(s), loop["radius"])
        if i in narrow_loops:
            at = rng.uniform(0, s[-1])
            radius *= 1 - 0.5 * np.exp(-(((s - at) / 12.0) ** 2))
        ends = np.cumsum(rng.uniform(40, 120, size=int(s[-1] / 40) + 2))  # segments of fluid (mostly) or gas
        fill = rng.choice([0, 1], size=len(ends) + 1, p=[0.85, 0.15])[np.searchsorted(ends, s)]
        m, dist, label = _tube((d, h, w), sp, centre, radius, fill, bounds("small_bowel"))
        closer = m & (dist < sb_dist)
        sb_dist[closer], sb_label[closer] = dist[closer], label[closer]
        sb_mask |= m

    # Stomach: a lobed sac; fluid at the back (the patient lies supine), air at the front.
    st = patient["stomach"]
    cx, cy = st["centre"]
    theta = np.arctan2(y - cy - dy, x - cx - dx)
    bumps = 1 + sum(a * np.cos((k + 2) * theta - p) for k, (a, p) in enumerate(zip(st["harmonics"], st["phases"])))
    rx, ry = (np.asarray(st["axes"]) * day["stomach_fill"])
    lo_s, hi_s = patient["z_range"]["stomach"]
    rel = np.sqrt(((x - cx - dx) / rx) ** 2 + ((y - cy - dy) / ry) ** 2) / np.maximum(z_profile(lo_s, hi_s) * bumps,
                                                                                       1e-6)
    stomach = rel < 1
    stomach_lumen = rel < 1 - 5.0 / min(rx, ry)
    level = cy + dy - ry + 2 * ry * (1 - day["fluid_level"])  # rows behind this line hold fluid

    masks = np.stack([lb_mask & cavity, sb_mask & cavity, stomach & cavity])

    # Tissue map, then contrast.
    value = {name: float(np.clip(rng.normal(mu, sd), 0.01, 1.0)) for name, (mu, sd) in TISSUE.items()}
    tissue = np.zeros((d, h, w), np.float32)
    tissue[body] = value["fat"]
    tissue[inside_fat] = value["muscle"]
    tissue[cavity] = value["cavity"]
    lx, ly, lrx, lry = patient["liver"]
    tissue[blob(lx, ly, lrx, lry, 0.0, 0.38) & cavity] = value["liver"]
    sx, sy, srx, sry = patient["spleen"]
    tissue[blob(sx, sy, srx, sry, 0.12, 0.36) & cavity] = value["spleen"]
    kx, ky, krx, kry = patient["kidney"]
    tissue[(blob(kx, ky, krx, kry, 0.30, 0.56) | blob(-kx, ky, krx, kry, 0.32, 0.58)) & cavity] = value["kidney"]
    spine = (x / 16) ** 2 + ((y - ay * 0.55) / 16) ** 2 < 1
    paraspinal = ((np.abs(x) - 30) / 22) ** 2 + ((y - ay * 0.62) / 18) ** 2 < 1
    tissue[np.broadcast_to(paraspinal, tissue.shape) & body] = value["muscle"]
    tissue[np.broadcast_to(spine, tissue.shape) & body] = value["marrow"]
    content_value = np.array([value[c] for c in CONTENTS], np.float32)
    for mask, dist, label, wall_mm in ((masks[1], sb_dist, sb_label, 2.5), (masks[0], lb_dist, lb_label, 3.5)):
        tissue[mask] = value["wall"]
        lumen = mask & (dist < -wall_mm)
        tissue[lumen] = content_value[label[lumen]]
    tissue[masks[2]] = value["wall"]
    lumen = masks[2] & np.broadcast_to(stomach_lumen, masks[2].shape)
    tissue[lumen] = np.where(np.broadcast_to(y > level, lumen.shape)[lumen], value["fluid"], value["air"])
    tissue *= (1 + 0.10 * smooth_noise(rng, tissue.shape, (max(2, d // 4), 24, 24))).astype(np.float32)

    # Acquisition: partial volume across slices, breathing blur on some, bias, scale, Rician noise.
    tissue = ndimage.gaussian_filter(tissue, sigma=(0.6, 0.5 * 1.5 / sp, 0.5 * 1.5 / sp))
    for z in np.flatnonzero(rng.random(d) < 0.06):
        tissue[z] = ndimage.gaussian_filter1d(tissue[z], sigma=rng.uniform(1.5, 3.5) * 1.5 / sp, axis=0)
    u, v = (x / (w * sp / 2)).astype(np.float32), (y / (h * sp / 2)).astype(np.float32)
    bias = bias_field(u, v, zf, rng.normal(0, 0.25, size=5))
    scale = float(np.exp(rng.uniform(np.log(300), np.log(15000))))
    sigma = scale * 0.5 / rng.uniform(8, 40)  # SNR of a mid-grey tissue between 8 and 40
    return rician_uint16(tissue * bias * scale, sigma, rng), masks
