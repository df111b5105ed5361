"""gd-train: Greedy Distill training and streaming generation.

    from gd_train import GreedyDistillPipeline, load_config

Names resolve on first use, so `import gd_train.config` (the launcher, the CLI) does not load torch or
diffusers."""

from importlib import import_module

_EXPORTS = {
    "GreedyDistillPipeline": "gd_train.pipeline",
    "load_config": "gd_train.config",
    "GreedyDistillStudent": "gd_train.model.student",
    "StreamingGenerator": "gd_train.infer.stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gd_train' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
