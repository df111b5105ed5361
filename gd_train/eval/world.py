"""A synthetic video world in latent space whose physics is known exactly (the toy teacher's data).

A clip is `(16, F, H, W)` latents holding one object: a Gaussian blob (sigma `BLOB_SIGMA` latent px,
amplitude `AMPLITUDE`) written into the four channels of its kind's signature, on a zero background.
It moves at a constant velocity and bounces off the walls (its centre is reflected into
`[lo, hi]` on each axis). The prompt states what moves, where to and how fast, e.g.
"red ball moving left quickly", so the velocity at frame 0 is known from the text alone; where the
object starts is not (the teacher chooses it from the noise).

Why this world needs more than two frames: the student's SDD sees x_0, x_{f-1} and the prompt, but
not f. After a bounce the object moves against the prompted direction, and whether it has bounced is
not decidable from x_0 and x_{f-1} alone (the same two positions occur before and after a bounce at
different f); x_{f-2}, which the ETM's c_f carries, decides it.

Everything is seeded: `sample_clip(spec, rng)` with a `numpy.random.Generator`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

CHANNELS = 16
HEIGHT, WIDTH = 8, 12  # latent grid of configs/toy/* (video 64 x 96)
BLOB_SIGMA = 1.5  # latent px
AMPLITUDE = 2.0
MARGIN = 1.5  # the centre stays this far inside the grid's first/last pixel centres

# Each kind writes its blob into its own four channels: which object it is can be read from the latents.
KINDS = {"red": (0, 1, 2, 3), "blue": (4, 5, 6, 7)}
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
SPEEDS = {"slowly": 0.5, "quickly": 1.0}  # latent px per latent frame

_PROMPT_RE = re.compile(r"^(?P<kind>\w+) ball moving (?P<direction>\w+) (?P<speed>\w+)$")


class PromptParseError(ValueError):
    """A caption that is not one of this world's prompts."""


@dataclass(frozen=True)
class MotionSpec:
    kind: str  # a key of KINDS
    direction: str  # a key of DIRECTIONS
    speed: str  # a key of SPEEDS

    @property
    def velocity(self) -> np.ndarray:
        """(dy, dx) in latent px per frame at frame 0."""
        return np.asarray(DIRECTIONS[self.direction]) * SPEEDS[self.speed]

    @property
    def prompt(self) -> str:
        return f"{self.kind} ball moving {self.direction} {self.speed}"


def all_specs() -> list[MotionSpec]:
    return [MotionSpec(k, d, s) for k, d, s in itertools.product(KINDS, DIRECTIONS, SPEEDS)]


def parse_prompt(caption: str) -> MotionSpec:
    m = _PROMPT_RE.match(caption.strip())
    if not m or m["kind"] not in KINDS or m["direction"] not in DIRECTIONS or m["speed"] not in SPEEDS:
        raise PromptParseError(f"caption {caption!r}: expected '<{'|'.join(KINDS)}> ball moving "
                               f"<{'|'.join(DIRECTIONS)}> <{'|'.join(SPEEDS)}>'")
    return MotionSpec(m["kind"], m["direction"], m["speed"])


def bounds(height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the object's centre, as (y, x)."""
    return np.array([MARGIN, MARGIN]), np.array([height - 1 - MARGIN, width - 1 - MARGIN])


def reflect(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Unfolded coordinate -> position in [lo, hi] with elastic bounces (a triangle wave)."""
    span = hi - lo
    r = np.mod(q - lo, 2 * span)
    return lo + np.where(r <= span, r, 2 * span - r)


def trajectory(start_yx: np.ndarray, velocity_yx: np.ndarray, frames: int, height: int = HEIGHT,
               width: int = WIDTH) -> np.ndarray:
    """(frames, 2) centre positions from `start_yx` at frame 0 moving at `velocity_yx` with bounces."""
    lo, hi = bounds(height, width)
    start = np.clip(np.asarray(start_yx, dtype=np.float64), lo, hi)
    t = np.arange(frames, dtype=np.float64)[:, None]
    return reflect(start[None] + t * np.asarray(velocity_yx, dtype=np.float64)[None], lo, hi)


def blob_profiles(pos: np.ndarray, size: int) -> np.ndarray:
    """Gaussian profile along one axis for each position: (len(pos), size)."""
    grid = np.arange(size, dtype=np.float64)
    return np.exp(-0.5 * ((grid[None] - np.asarray(pos, dtype=np.float64)[:, None]) / BLOB_SIGMA) ** 2)


def render(kind: str, positions_yx: np.ndarray, height: int = HEIGHT, width: int = WIDTH,
           amplitude: float = AMPLITUDE) -> torch.Tensor:
    """Latents (16, F, H, W) of one object of `kind` at each frame's position."""
    positions_yx = np.asarray(positions_yx, dtype=np.float64)
    gy = blob_profiles(positions_yx[:, 0], height)  # (F, H)
    gx = blob_profiles(positions_yx[:, 1], width)  # (F, W)
    blob = amplitude * gy[:, :, None] * gx[:, None, :]  # (F, H, W)
    out = np.zeros((CHANNELS, len(positions_yx), height, width), dtype=np.float32)
    for c in KINDS[kind]:
        out[c] = blob
    return torch.from_numpy(out)


@dataclass(frozen=True)
class WorldClip:
    spec: MotionSpec
    positions: np.ndarray  # (F, 2) true centres (y, x)
    latents: torch.Tensor  # (16, F, H, W)


def sample_clip(spec: MotionSpec, frames: int, rng: np.random.Generator, height: int = HEIGHT,
                width: int = WIDTH) -> WorldClip:
    lo, hi = bounds(height, width)
    start = lo + rng.random(2) * (hi - lo)
    positions = trajectory(start, spec.velocity, frames, height, width)
    return WorldClip(spec=spec, positions=positions, latents=render(spec.kind, positions, height, width))


def sample_specs(count: int, rng: np.random.Generator, specs: Optional[list[MotionSpec]] = None) -> list[MotionSpec]:
    """`count` specs cycling through every combination in a seeded order (balanced classes)."""
    specs = list(specs or all_specs())
    out: list[MotionSpec] = []
    while len(out) < count:
        out += [specs[i] for i in rng.permutation(len(specs))]
    return out[:count]


def bounce_count(spec: MotionSpec, start_yx: np.ndarray, frames: int) -> int:
    """How many times the object turns within `frames` (for reports)."""
    pos = trajectory(start_yx, spec.velocity, frames)
    step = np.diff(pos, axis=0)
    axis = int(np.argmax(np.abs(spec.velocity)))
    signs = np.sign(step[:, axis])
    return int(np.sum(signs[1:] * signs[:-1] < 0)) if len(signs) > 1 else 0

