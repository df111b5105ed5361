"""Exact metrics of the synthetic world (`gd_train.eval.world`), computed on generated latents.

Written once and used by the unit tests, the trainer's evaluation hook and the reference experiment.

Position: a matched filter. For each frame the object's centre is the (y, x) whose rendered blob,
with its best amplitude, explains the prompted kind's signature channels best (a 0.1 px grid search
over the whole grid, refined by a parabola through the neighbours on each axis). On a clip rendered
by the world it recovers the true centres, wall-truncated blobs included (a centroid would be biased
inward near walls).

Per clip, against the true trajectory continued from the clip's own first frame (the start position
is whatever the model chose; the velocity is the prompt's, bounces included):
- `position_error[f]`: distance (latent px) between the measured and the true centre at frame f;
- `velocity_error`: mean |measured displacement - true displacement| per frame;
- `direction_cosine`: cosine between measured and true displacements, averaged with the true step
  lengths as weights (1 perfect, 0 frozen, -1 reversed): prompt adherence of the motion;
- `shape_error`: energy of the latents left after removing the fitted blob, over all 16 channels,
  as a fraction of their energy (0 for exactly one blob of the right shape; a second object, a
  smeared blob or noise raise it);
- `amplitude_ratio`: fitted amplitude / the world's;
- `identity`: the prompted kind's share of the energy in the two kinds' signature channels
  (prompt adherence of the object: 1 right object, 0 the other one).

Against the clip's own motion, whatever the prompt says (`motion_continuation`): a constant velocity
with bounces fitted to the first frames' measured track, then
- `motion_residual`: the fit's RMS distance over those frames (velocity consistency: 0 for any
  constant-velocity/bounce motion, however wrong its direction);
- `fitted_speed`: its speed (a frozen clip fits perfectly at 0, so the residual alone does not tell);
- `continuation_error`: the mean distance over the later frames from that motion continued — the
  long-horizon drift of a stream that started a motion, separate from whether it obeyed the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from gd_train.eval import world
from gd_train.eval.world import AMPLITUDE, KINDS, MotionSpec

GRID_STEP = 0.1  # latent px of the position search before the parabolic refinement
_EPS = 1e-12


@dataclass(frozen=True)
class FrameFit:
    positions: np.ndarray  # (F, 2) measured centres (y, x)
    amplitude: np.ndarray  # (F,)
    shape_error: np.ndarray  # (F,)


def _as_cfhw(latents: torch.Tensor | np.ndarray) -> np.ndarray:
    x = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents, np.float32)
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 4 or x.shape[0] != world.CHANNELS:
        raise ValueError(f"latents: expected ({world.CHANNELS}, F, H, W) or (1, {world.CHANNELS}, F, H, W), got {x.shape}")
    return x.astype(np.float64)


def _refine(scores: np.ndarray, i: int) -> float:
    """Sub-grid offset (in grid steps) of a maximum at index i, from a parabola through i-1, i, i+1."""
    if i == 0 or i == len(scores) - 1:
        return 0.0
    a, b, c = scores[i - 1], scores[i], scores[i + 1]
    denom = a - 2 * b + c
    return float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5)) if denom < 0 else 0.0


def fit_frames(latents, kind: str) -> FrameFit:
    """Matched-filter fit of one `kind` blob per frame (see the module docstring)."""
    x = _as_cfhw(latents)
    _, F, H, W = x.shape
    sig = x[list(KINDS[kind])].sum(axis=0)  # (F, H, W)
    ys = np.arange(0.0, H - 1 + 1e-9, GRID_STEP)
    xs = np.arange(0.0, W - 1 + 1e-9, GRID_STEP)
    gy, gx = world.blob_profiles(ys, H), world.blob_profiles(xs, W)  # (Ny, H), (Nx, W)
    corr = np.einsum("yh,fhw,xw->fyx", gy, sig, gx)  # <signature sum, unit blob>
    norm = len(KINDS[kind]) * np.outer((gy ** 2).sum(1), (gx ** 2).sum(1))  # |unit blob|^2 over the channels
    score = np.where(corr > 0, corr, 0.0) / np.sqrt(norm)[None]
    positions = np.zeros((F, 2))
    amplitude = np.zeros(F)
    for f in range(F):
        iy, ix = np.unravel_index(int(np.argmax(score[f])), score[f].shape)
        py = ys[iy] + GRID_STEP * _refine(score[f, :, ix], iy)
        px = xs[ix] + GRID_STEP * _refine(score[f, iy, :], ix)
        positions[f] = (py, px)
    by, bx = world.blob_profiles(positions[:, 0], H), world.blob_profiles(positions[:, 1], W)
    unit = by[:, :, None] * bx[:, None, :]  # (F, H, W)
    amplitude = np.maximum((sig * unit).sum((1, 2)) / (len(KINDS[kind]) * (unit ** 2).sum((1, 2))), 0.0)
    model = np.zeros_like(x)
    for c in KINDS[kind]:
        model[c] = amplitude[:, None, None] * unit
    energy = (x ** 2).sum(axis=(0, 2, 3))
    shape_error = ((x - model) ** 2).sum(axis=(0, 2, 3)) / np.maximum(energy, _EPS)
    shape_error = np.where(energy > _EPS, shape_error, 1.0)  # an empty frame explains nothing
    return FrameFit(positions=positions, amplitude=amplitude, shape_error=shape_error)


def identity(latents, kind: str) -> float:
    x = _as_cfhw(latents)
    own = float((x[list(KINDS[kind])] ** 2).sum())
    other = sum(float((x[list(ch)] ** 2).sum()) for k, ch in KINDS.items() if k != kind)
    return own / max(own + other, _EPS)


@dataclass
class ClipScore:
    position_error: np.ndarray  # (F,) latent px
    velocity_error: float
    direction_cosine: float
    shape_error: float
    amplitude_ratio: float
    identity: float
    positions: np.ndarray = field(repr=False)  # (F, 2) measured
    reference: np.ndarray = field(repr=False)  # (F, 2) true trajectory from the first frame

    def scalars(self, horizon: Optional[int] = None) -> dict[str, float]:
        """The clip's numbers; position error as the mean over frames 1..horizon-1 and the last of them."""
        err = self.position_error[: horizon or len(self.position_error)]
        return {"position_error": float(err[1:].mean()) if len(err) > 1 else 0.0,
                "final_position_error": float(err[-1]),
                "velocity_error": self.velocity_error, "direction_cosine": self.direction_cosine,
                "shape_error": self.shape_error, "amplitude_ratio": self.amplitude_ratio, "identity": self.identity}


def score_clip(latents, spec: MotionSpec, start_yx: Optional[np.ndarray] = None) -> ClipScore:
    """Score a generated clip against the world's physics for `spec` (see the module docstring).
    `start_yx`: the true start when known (teacher-forced use); else measured from frame 0."""
    x = _as_cfhw(latents)
    fit = fit_frames(x, spec.kind)
    F = x.shape[1]
    start = fit.positions[0] if start_yx is None else np.asarray(start_yx, dtype=np.float64)
    ref = world.trajectory(start, spec.velocity, F, x.shape[2], x.shape[3])
    err = np.linalg.norm(fit.positions - ref, axis=1)
    if F > 1:
        d_meas, d_ref = np.diff(fit.positions, axis=0), np.diff(ref, axis=0)
        vel_err = float(np.linalg.norm(d_meas - d_ref, axis=1).mean())
        n_meas, n_ref = np.linalg.norm(d_meas, axis=1), np.linalg.norm(d_ref, axis=1)
        cos = (d_meas * d_ref).sum(1) / np.maximum(n_meas * n_ref, 1e-6)
        # Weighted by the true step length: a step that straddles a bounce is short and its direction moot.
        direction = float((cos * n_ref).sum() / max(n_ref.sum(), 1e-6))
    else:
        vel_err, direction = 0.0, 1.0
    return ClipScore(position_error=err, velocity_error=vel_err, direction_cosine=direction,
                     shape_error=float(fit.shape_error.mean()), amplitude_ratio=float(fit.amplitude.mean() / AMPLITUDE),
                     identity=identity(x, spec.kind), positions=fit.positions, reference=ref)


FIT_SPEED_MAX = 1.5  # latent px per frame: above the world's fastest speed (1.0)
FIT_COARSE, FIT_FINE = 0.05, 0.005


def fit_motion(positions: np.ndarray, height: int = world.HEIGHT, width: int = world.WIDTH
               ) -> tuple[np.ndarray, float]:
    """The velocity (y, x) whose bounce trajectory from positions[0] best explains `positions` (least
    squares; a coarse grid then a fine one around its best point), and the fit's RMS distance."""
    positions = np.asarray(positions, dtype=np.float64)
    lo, hi = world.bounds(height, width)
    start = np.clip(positions[0], lo, hi)
    t = np.arange(len(positions), dtype=np.float64)[None, :, None]

    def best(centre: np.ndarray, half: float, step: float) -> tuple[np.ndarray, float]:
        axis = np.arange(-half, half + step / 2, step)
        grid = centre + np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (G, 2)
        tracks = world.reflect(start + t * grid[:, None, :], lo, hi)  # (G, F, 2)
        mse = ((tracks - positions[None]) ** 2).sum(-1).mean(-1)
        i = int(np.argmin(mse))
        return grid[i], float(np.sqrt(mse[i]))

    velocity, _ = best(np.zeros(2), FIT_SPEED_MAX, FIT_COARSE)
    return best(velocity, FIT_COARSE, FIT_FINE)


def motion_continuation(positions: np.ndarray, fitted_frames: int, height: int = world.HEIGHT,
                        width: int = world.WIDTH) -> dict[str, float]:
    """Fit the motion of frames 0 .. fitted_frames-1 and score the rest against its continuation (see the
    module docstring). `continuation_error` is NaN when the clip has no frame after the fitted ones."""
    positions = np.asarray(positions, dtype=np.float64)
    if not 2 <= fitted_frames <= len(positions):
        raise ValueError(f"fitted_frames: expected 2 .. {len(positions)} (the clip's frames), got {fitted_frames}")
    velocity, residual = fit_motion(positions[:fitted_frames], height, width)
    continued = world.trajectory(positions[0], velocity, len(positions), height, width)
    later = np.linalg.norm(positions[fitted_frames:] - continued[fitted_frames:], axis=1)
    return {"motion_residual": residual, "fitted_speed": float(np.linalg.norm(velocity)),
            "continuation_error": float(later.mean()) if len(later) else float("nan")}


def next_frame_error(frame, spec: MotionSpec, true_yx: np.ndarray) -> float:
    """Distance (latent px) of one generated frame's object from where the world puts it."""
    fit = fit_frames(frame, spec.kind)
    return float(np.linalg.norm(fit.positions[0] - np.asarray(true_yx, dtype=np.float64)))


def reference_positions(latents, spec: MotionSpec) -> np.ndarray:
    """The world's trajectory for a clip whose truth is not stored (a teacher sample): from the
    measured frame-0 position, at the prompt's velocity."""
    x = _as_cfhw(latents)
    start = fit_frames(x[:, :1], spec.kind).positions[0]
    return world.trajectory(start, spec.velocity, x.shape[1], x.shape[2], x.shape[3])


def summarise(values: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, n}} over clips (std with ddof=0; n the count)."""
    rows = list(values)
    out = {}
    for key in rows[0] if rows else []:
        v = np.array([r[key] for r in rows], dtype=np.float64)
        out[key] = {"mean": float(v.mean()), "std": float(v.std()), "n": int(len(v))}
    return out
