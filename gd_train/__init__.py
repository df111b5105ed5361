"""gd-train: Greedy Distill training and streaming generation.

    from gd_train import GreedyDistillPipeline, load_config

Names resolve on first use, so `import gd_train.config` (the launcher, the CLI) does not load torch or
diffusers."""

from gd_train._lazy import lazy_exports

_EXPORTS = {
    "GreedyDistillPipeline": "gd_train.pipeline",
    "load_config": "gd_train.config",
    "GreedyDistillStudent": "gd_train.model.student",
    "StreamingGenerator": "gd_train.infer.stream",
}
__all__, __getattr__, __dir__ = lazy_exports("gd_train", _EXPORTS)
