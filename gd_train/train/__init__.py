"""Training: the DeepSpeed loop (`Trainer`, `train`) for both stages and their objectives. Names
resolve on first use: the launcher and the CLI import `gd_train.train.plan` without the model stack."""

from gd_train._lazy import lazy_exports

_EXPORTS = {
    "Trainer": "gd_train.train.trainer",
    "train": "gd_train.train.trainer",
    "NextChunkLoss": "gd_train.train.objectives",
    "RLFineTuneLoss": "gd_train.train.objectives",
    "build_objective": "gd_train.train.objectives",
    "BatchPlan": "gd_train.train.plan",
}
__all__, __getattr__, __dir__ = lazy_exports("gd_train.train", _EXPORTS)
