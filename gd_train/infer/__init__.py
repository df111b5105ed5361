"""Streaming generation (Algorithm 1): `StreamingGenerator` and its `StreamSettings`. Names resolve on
first use, so `import gd_train.infer` stays cheap."""

from gd_train._lazy import lazy_exports

_EXPORTS = {
    "StreamingGenerator": "gd_train.infer.stream",
    "StreamSettings": "gd_train.infer.stream",
    "PromptSchedule": "gd_train.infer.stream",
}
__all__, __getattr__, __dir__ = lazy_exports("gd_train.infer", _EXPORTS)
