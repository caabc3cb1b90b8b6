"""The three reference stains of every HPA image and the microscope optics.

Per cell, in its box: blue = DAPI-like nucleus with chromatin texture and dark nucleoli (condensed and
bright in mitosis), red = microtubules radiating from the centrosome (a bipolar spindle in mitosis),
yellow = reticular ER, densest around the nucleus. Per image: uneven illumination, optical blur,
shot + read noise, 8-bit quantisation. Signals are float32 in [0, ~1] until ``to_uint8``.
"""

from __future__ import annotations

import cv2
import numpy as np

from weakcell.synthetic.geometry import Cell


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field of unit standard deviation and correlation length ``sigma`` px.

    Wide fields are drawn on a grid ``sigma / 2`` times coarser and upsampled: the field has no detail
    finer than ``sigma`` anyway, and a 2048² field at sigma 7 costs ~20x less this way."""
    factor = max(1, int(sigma // 2))
    coarse = (-(-shape[0] // factor), -(-shape[1] // factor))
    blurred = cv2.GaussianBlur(
        rng.standard_normal(coarse, dtype=np.float32), (0, 0), max(sigma / factor, 0.3)
    )
    field = np.asarray(blurred, dtype=np.float32)  # no copy: cv2's stubs do not carry the dtype
    field /= max(float(field.std()), 1e-6)
    if factor == 1:
        return field
    return cv2.resize(field, (coarse[1] * factor, coarse[0] * factor), interpolation=cv2.INTER_LINEAR)[
        : shape[0], : shape[1]
    ]


def reticulum_field(rng: np.random.Generator, shape: tuple[int, int], mesh: float) -> np.ndarray:
    """A net of thin tubules with ``mesh`` px between strands: the zero-crossings of band-pass noise."""
    band = smooth_noise(rng, shape, mesh / 4) - 0.6 * smooth_noise(rng, shape, mesh / 2)
    return np.exp(-((band / 0.25) ** 2)).astype(np.float32)


def distance_inside(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``mask`` to its edge, px (0 outside). The box edge counts as inside,
    so cells cut by the image border get no false rim along the border."""
    # A mask without any outside pixel gets FLT_MAX from OpenCV; cap it at the box diagonal.
    return np.minimum(cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3), float(sum(mask.shape)))


def distance_outside(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel outside ``mask`` to it, px (0 inside)."""
    if not mask.any():
        return np.full(mask.shape, 1e3, dtype=np.float32)
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)


def draw_curves(
    canvas: np.ndarray,
    rng: np.random.Generator,
    starts: np.ndarray,
    directions: np.ndarray,
    length: float,
    step: float,
    wiggle: float,
    thickness: int,
    brightness: np.ndarray | float = 1.0,
) -> None:
    """Draw one random-walk curve per start point ``(N, 2)`` (y, x), heading ``directions`` (radians),
    ``length`` px long in ``step`` px segments whose heading drifts by ``wiggle`` radians per step."""
    n_steps = max(2, int(length / step))
    turns = np.cumsum(rng.normal(0, wiggle, (len(starts), n_steps)), axis=1) + directions[:, None]
    ys = starts[:, :1] + np.cumsum(step * np.sin(turns), axis=1)
    xs = starts[:, 1:] + np.cumsum(step * np.cos(turns), axis=1)
    points = np.stack([np.concatenate([starts[:, 1:], xs], 1), np.concatenate([starts[:, :1], ys], 1)], -1)
    # cv2 draws with integer coordinates; 4 fractional bits keep sub-pixel precision for thin lines.
    fixed = np.round(points * 16).astype(np.int32)
    values = np.broadcast_to(np.asarray(brightness, dtype=np.float64), (len(starts),))
    # One cv2 call per brightness level instead of one per curve (thousands per image); 8 levels are
    # indistinguishable after blur and noise.
    levels = np.round(values * 8) / 8
    for level in np.unique(levels):
        cv2.polylines(
            canvas, list(fixed[levels == level]), False, float(level), thickness, cv2.LINE_AA, shift=4
        )


def draw_dots(
    canvas: np.ndarray, centers: np.ndarray, radii: np.ndarray, brightness: np.ndarray | float = 1.0
) -> None:
    """Filled discs at ``centers`` ``(N, 2)`` (y, x) with ``radii`` px (sub-pixel radii stay visible)."""
    values = np.broadcast_to(np.asarray(brightness, dtype=np.float64), (len(centers),))
    for (y, x), radius, value in zip(centers, radii, values):
        cv2.circle(
            canvas,
            (round(x * 16), round(y * 16)),
            max(8, round(radius * 16)),
            float(value),
            -1,
            cv2.LINE_AA,
            shift=4,
        )


def sample_points(
    rng: np.random.Generator, where: np.ndarray, n: int, weight: np.ndarray | None = None
) -> np.ndarray:
    """``n`` random pixel positions ``(n, 2)`` (y, x) inside bool ``where``, optionally ``weight``-ed."""
    ys, xs = np.nonzero(where)
    if len(ys) == 0 or n <= 0:
        return np.zeros((0, 2))
    p = None
    if weight is not None:
        w = weight[ys, xs].astype(np.float64) + 1e-9
        p = w / w.sum()
    pick = rng.choice(len(ys), size=n, p=p)
    return np.stack([ys[pick], xs[pick]], 1) + rng.uniform(-0.5, 0.5, (n, 2))


def nucleus_stain(rng: np.random.Generator, cell: Cell, scale: float) -> np.ndarray:
    """Blue: chromatin texture over the nucleus, nucleoli dimmer, a brighter bar when condensed."""
    texture = smooth_noise(rng, cell.mask.shape, 4.0 * scale)
    if cell.mitotic:
        return (cell.nucleus * (0.95 + 0.1 * texture)).astype(np.float32)
    fine = smooth_noise(rng, cell.mask.shape, 1.5 * scale)
    brightness = rng.uniform(0.45, 0.75)
    stain = brightness * (1.0 + 0.15 * texture + 0.08 * fine)
    stain = np.where(cell.nucleoli, 0.65 * stain, stain)
    # Slight blur so the nuclear edge is soft like a real DAPI image.
    return cv2.GaussianBlur((stain * cell.nucleus).astype(np.float32), (0, 0), max(0.3, 1.5 * scale))


def microtubule_stain(rng: np.random.Generator, cell: Cell, scale: float) -> np.ndarray:
    """Red: filaments from the centrosome to the periphery, or a spindle between the two poles."""
    canvas = np.zeros(cell.mask.shape, dtype=np.float32)
    thickness = max(1, round(2.0 * scale))
    if cell.mitotic:
        poles = np.asarray(cell.mtoc)
        for pole, target in ((poles[0], poles[1]), (poles[1], poles[0])):
            heading = np.arctan2(*(target - pole))
            n = 30
            directions = heading + rng.normal(0, 0.35, n)
            starts = np.repeat(pole[None], n, 0)
            draw_curves(
                canvas,
                rng,
                starts,
                directions,
                float(np.hypot(*(target - pole))) * 0.55,
                2.0,
                0.04,
                thickness,
            )
        return 0.25 * cell.mask + 0.8 * canvas * cell.mask
    n = int(np.clip(cell.area / (30.0 * scale + 1), 40, 400))
    starts = np.repeat(np.asarray(cell.mtoc[0])[None], n, 0) + rng.normal(0, 3.0 * scale, (n, 2))
    draw_curves(
        canvas,
        rng,
        starts,
        rng.uniform(0, 2 * np.pi, n),
        2.5 * cell.radius,
        6.0 * scale + 1.0,
        0.15,
        thickness,
        rng.uniform(0.2, 0.7, n),
    )
    grain = 1.0 + 0.3 * smooth_noise(rng, cell.mask.shape, 2.0 * scale + 0.3)
    # Microtubules reach the thin periphery, so they fade less than the ER (no nuclear dome here).
    edge = 1.0 - 0.7 * np.exp(-distance_inside(cell.mask) / (12.0 * scale + 0.5))
    signal = edge * (0.12 * grain + 0.6 * canvas)
    # Filaments also run above and below the nucleus (the cell is 3-D): a dimmer layer over it.
    return signal * cell.mask * np.where(cell.nucleus, 0.35, 1.0)


def cell_thickness(cell: Cell, scale: float) -> np.ndarray:
    """Relative height of the cell (box array): thickest over the nucleus, thinning to a soft edge, so
    cytoplasmic stains fade outward and cell borders look fuzzy as in widefield-like HPA images."""
    dome = 0.35 + 0.65 * np.exp(-distance_outside(cell.nucleus) / (0.5 * cell.radius + 1))
    edge = 1.0 - 0.8 * np.exp(-distance_inside(cell.mask) / (15.0 * scale + 0.5))
    return (dome * edge).astype(np.float32)


def er_stain(cell: Cell, reticulum: np.ndarray, scale: float) -> np.ndarray:
    """Yellow: the image's reticular field, densest around the nucleus and fading to the cell edge;
    the nuclear envelope is continuous with the ER, so it shows as a faint rim."""
    if cell.mitotic:  # the ER disperses during mitosis
        return ((0.3 + 0.3 * reticulum) * cell.mask).astype(np.float32)
    from_nucleus = distance_outside(cell.nucleus)
    density = 0.1 + 1.1 * np.exp(-from_nucleus / (0.3 * cell.radius + 1))
    envelope = 0.3 * np.exp(-distance_inside(cell.nucleus) / (2.0 * scale + 0.5)) * cell.nucleus
    reticular = (0.15 + 0.85 * reticulum) * density * cell_thickness(cell, scale)
    return (reticular * cell.mask * np.where(cell.nucleus, 0.25, 1.0) + envelope).astype(np.float32)


def illumination_field(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Multiplicative shading ``(size, size)``: a smooth tilt plus vignetting, mean ~1. Computed on a
    64² grid and upsampled, since it varies only over hundreds of pixels."""
    grid = np.linspace(-0.5, 0.5, 64, dtype=np.float32)
    yy, xx = grid[:, None], grid[None, :]
    tilt = rng.normal(0, 1, 2)
    shading = 1.0 + amplitude * (0.15 * (tilt[0] * yy + tilt[1] * xx) - 0.4 * (yy**2 + xx**2))
    shading = np.clip(shading, 0.2, None).astype(np.float32)
    return cv2.resize(shading, (size, size), interpolation=cv2.INTER_LINEAR)


def apply_optics(
    planes: np.ndarray, rng: np.random.Generator, scale: float, blur: float, noise: float, illumination: float
) -> np.ndarray:
    """``(4, H, W)`` float signal -> ``(4, H, W)`` uint8 image: shading, blur, noise, offset, 8 bits.

    The PSF is ~2 px at 2048² (sigma scales with ``scale``); shot noise grows with the square root of
    the signal, read noise is flat; a per-channel camera offset of 0-3 grey levels shows in background.
    """
    size = planes.shape[-1]
    shading = illumination_field(rng, size, illumination)
    sigma = blur * max(0.5, 1.6 * scale)
    out = np.empty(planes.shape, dtype=np.uint8)
    # One standard-normal field per image, read at a random circular shift per channel: each channel
    # still sees independent-looking pixel noise, at a quarter of the cost (4M normals take ~70 ms).
    gaussian = rng.standard_normal(planes.shape[1:], dtype=np.float32)
    for index, plane in enumerate(planes):
        # In-place float32 steps: at 2048² every temporary array costs 16 MB and ~5 ms.
        signal = np.asarray(
            cv2.multiply(plane, shading, scale=float(rng.uniform(0.8, 1.2))), dtype=np.float32
        )
        if sigma > 0:
            signal = np.asarray(cv2.GaussianBlur(signal, (0, 0), sigma), dtype=np.float32)
        np.maximum(signal, 0, out=signal)
        # Shot (variance ∝ signal) and read noise (flat) are independent: one normal draw with their
        # summed variance has the same distribution.
        sd = cv2.sqrt(signal * np.float32(0.035**2) + np.float32(0.006**2))
        fluctuation = np.roll(gaussian, tuple(rng.integers(0, size, 2)), axis=(0, 1))
        fluctuation *= sd
        signal += np.float32(noise) * fluctuation
        signal += np.float32(rng.uniform(0, 3.0) / 255 + 0.5 / 255)  # camera offset + rounding
        signal *= 255
        np.clip(signal, 0, 255, out=signal)
        out[index] = signal
    return out
