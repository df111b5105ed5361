"""How many frames each prompt's teacher clip gets: the `datagen.lengths` policy (docs/data.md, "Lengths").

Lengths are pixel frames 1 + 4k (the Wan VAE compresses time by 4: latent frames = 1 + (n - 1) // 4).
The choice is a function of the policy, the run seed, the prompt's key and (mode `source`) the CSV row's
duration columns only, so every worker, rerun and retry plans the same length for a prompt:

- `fixed`: `video.num_frames` for every prompt (the behaviour before per-sample lengths);
- `choices`: one of `choices`, drawn with `weights` from a uniform number hashed from (seed, key);
- `source`: the source clip's duration (OpenVidHD `seconds`, else `frame` / `fps`) times `video.fps`,
  snapped to the nearest 1 + 4k and clamped into [`min_frames`, `max_frames`]. A row without a readable
  duration is a bad row (`on_missing: bad_row`) or gets `video.num_frames` (`on_missing: fixed`).

The teacher's cost grows about quadratically with the latent frames (attention over F x H x W tokens),
so plans are costed in teacher-frame-equivalents (`cost_units`): a clip of F latent frames counts
F² / F_ref, F_ref being the latent frames of `video.num_frames`; a clip at `video.num_frames` counts
F_ref, one latent frame of it counts 1.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from gd_train.config import VAE_TEMPORAL, ConfigError

MODES = ("fixed", "choices", "source")
ON_MISSING = ("bad_row", "fixed")
DURATION_COLUMNS = ("seconds", "frame", "fps")


class LengthError(ValueError):
    """A CSV row whose duration cannot be read (mode `source`); the message is the bad row's reason."""


def is_valid_length(frames: Any) -> bool:
    return isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1 and (frames - 1) % VAE_TEMPORAL == 0


def latent_frames(frames: int) -> int:
    return 1 + (frames - 1) // VAE_TEMPORAL


def snap(frames: float, min_frames: int, max_frames: int) -> int:
    """The 1 + 4k nearest to `frames` (halves round up), clamped into [min_frames, max_frames]."""
    k = math.floor((frames - 1) / VAE_TEMPORAL + 0.5)
    return min(max(1 + VAE_TEMPORAL * k, min_frames), max_frames)


def _unit_interval(seed: int, key: str) -> float:
    """A number in [0, 1) from (seed, key) only; its own hash domain, unrelated to the noise seed."""
    return int.from_bytes(hashlib.sha256(f"length/{seed}/{key}".encode()).digest()[:8], "big") / 2.0**64


def _positive(text: Optional[str]) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class LengthPlanner:
    """The checked `datagen.lengths` policy, with what it needs from the config (fps, default length)."""

    mode: str
    seed: int
    default_frames: int  # video.num_frames: mode fixed, and the on_missing=fixed fallback
    fps: float  # video.fps, the teacher's frame rate
    choices: tuple[int, ...] = ()
    cumulative: tuple[float, ...] = ()  # normalised cumulative weights of `choices`
    min_frames: int = 1
    max_frames: int = 1
    on_missing: str = "bad_row"

    @classmethod
    def from_config(cls, cfg) -> "LengthPlanner":
        """Check `datagen.lengths` (one-line `ConfigError` naming the key) and build the policy."""
        p, v = cfg.datagen.lengths, cfg.video

        def refuse(key: str, expected: str, got: Any) -> None:
            raise ConfigError(f"key 'datagen.lengths.{key}': expected {expected}, got {got!r}")

        if p.mode not in MODES:
            refuse("mode", " | ".join(MODES), p.mode)
        needs_default = p.mode == "fixed" or (p.mode == "source" and p.on_missing == "fixed")
        if needs_default and not is_valid_length(v.num_frames):
            raise ConfigError(f"key 'video.num_frames': {v.num_frames!r} is not 1 + 4k (datagen.lengths.mode={p.mode} "
                              "gives it to prompts)")
        policy = dict(mode=p.mode, seed=int(cfg.seed), default_frames=int(v.num_frames), fps=float(v.fps))
        if p.mode == "choices":
            choices, weights = list(p.choices), list(p.weights)
            if not choices or not all(is_valid_length(c) for c in choices):
                refuse("choices", "a non-empty list of lengths 1 + 4k (pixel frames, e.g. [81, 161])", choices)
            if len(set(choices)) != len(choices):
                refuse("choices", "distinct lengths", choices)
            if weights and (len(weights) != len(choices) or not all(math.isfinite(w) and w >= 0 for w in weights)
                            or sum(weights) <= 0):
                refuse("weights", f"empty (equal) or {len(choices)} non-negative numbers, not all 0", weights)
            weights = weights or [1.0] * len(choices)
            total, running, cumulative = sum(weights), 0.0, []
            for w in weights:
                running += w
                cumulative.append(running / total)
            cumulative[-1] = 1.0
            policy.update(choices=tuple(choices), cumulative=tuple(cumulative))
        elif p.mode == "source":
            for key in ("min_frames", "max_frames"):
                if not is_valid_length(p[key]):
                    refuse(key, "a length 1 + 4k (pixel frames)", p[key])
            if p.min_frames > p.max_frames:
                refuse("max_frames", f">= datagen.lengths.min_frames={p.min_frames}", p.max_frames)
            if p.on_missing not in ON_MISSING:
                refuse("on_missing", " | ".join(ON_MISSING), p.on_missing)
            if not (v.fps > 0):
                raise ConfigError(f"key 'video.fps': expected > 0 (mode=source converts durations with it), got {v.fps!r}")
            policy.update(min_frames=int(p.min_frames), max_frames=int(p.max_frames), on_missing=p.on_missing)
        return cls(**policy)

    @property
    def reads_rows(self) -> bool:
        """Whether the choice needs the CSV row's duration columns."""
        return self.mode == "source"

    @property
    def possible_lengths(self) -> Optional[tuple[int, ...]]:
        """Every length this policy can plan, when it is a short list (None for `source`)."""
        return {"fixed": (self.default_frames,), "choices": self.choices}.get(self.mode)

    def settings(self) -> Optional[dict[str, Any]]:
        """What a manifest records (None for mode fixed: video.num_frames already says it all, and
        folders written before per-sample lengths keep resuming)."""
        if self.mode == "fixed":
            return None
        if self.mode == "choices":
            weights = [b - a for a, b in zip((0.0,) + self.cumulative, self.cumulative)]
            return {"mode": "choices", "choices": list(self.choices), "weights": [round(w, 9) for w in weights]}
        return {"mode": "source", "min_frames": self.min_frames, "max_frames": self.max_frames,
                "on_missing": self.on_missing}

    def choose(self, key: str, row: Optional[Mapping[str, Optional[str]]] = None) -> tuple[int, bool]:
        """(pixel frames, fell back to video.num_frames) for one prompt; `row`: the CSV row's duration
        columns by name (mode source). Raises `LengthError` for an unreadable duration under bad_row."""
        if self.mode == "fixed":
            return self.default_frames, False
        if self.mode == "choices":
            return self.choices[bisect.bisect_right(self.cumulative, _unit_interval(self.seed, key))], False
        row = row or {}
        seconds = _positive(row.get("seconds"))
        if seconds is None:
            frame, fps = _positive(row.get("frame")), _positive(row.get("fps"))
            seconds = frame / fps if frame is not None and fps is not None else None
        if seconds is None:
            if self.on_missing == "fixed":
                return self.default_frames, True
            shown = ", ".join(f"'{c}' {str(row.get(c))[:20]!r}" if row.get(c) is not None else f"no '{c}'"
                              for c in DURATION_COLUMNS)
            raise LengthError(f"no readable duration ({shown}; datagen.lengths.mode=source needs 'seconds' > 0 "
                              "or 'frame' and 'fps' > 0)")
        return snap(seconds * self.fps, self.min_frames, self.max_frames), False


def reference_latent_frames(cfg) -> int:
    return latent_frames(int(cfg.video.num_frames))


def cost_units(histogram: Mapping[int, int], reference: int) -> float:
    """Teacher-frame-equivalents of a plan ({latent frames: samples}): F² / reference per sample."""
    return sum(count * f * f for f, count in histogram.items()) / reference
