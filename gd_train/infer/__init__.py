"""Streaming generation (Algorithm 1): `StreamingGenerator` and its `StreamSettings`. Names resolve on
first use, so `import gd_train.infer` stays cheap."""

from importlib import import_module

_EXPORTS = {
    "StreamingGenerator": "gd_train.infer.stream",
    "StreamSettings": "gd_train.infer.stream",
    "PromptSchedule": "gd_train.infer.stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gd_train.infer' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
