"""Evaluation: the synthetic world and its exact metrics, and the evaluators the trainer runs every
`train.eval_every` steps (`gd_train.eval.evaluators`)."""

from gd_train.eval.metrics import ClipScore, fit_frames, next_frame_error, score_clip, summarise
from gd_train.eval.world import MotionSpec, WorldClip, all_specs, parse_prompt, render, sample_clip, trajectory

__all__ = ["ClipScore", "MotionSpec", "WorldClip", "all_specs", "fit_frames", "next_frame_error", "parse_prompt",
           "render", "sample_clip", "score_clip", "summarise", "trajectory"]
