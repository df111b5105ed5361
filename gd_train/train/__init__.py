"""Training: the DeepSpeed loop (`Trainer`, `train`) for both stages and their objectives. Names
resolve on first use: the launcher and the CLI import `gd_train.train.plan` without the model stack."""

from importlib import import_module

_EXPORTS = {
    "Trainer": "gd_train.train.trainer",
    "train": "gd_train.train.trainer",
    "NextChunkLoss": "gd_train.train.objectives",
    "RLFineTuneLoss": "gd_train.train.objectives",
    "build_objective": "gd_train.train.objectives",
    "BatchPlan": "gd_train.train.plan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gd_train.train' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
