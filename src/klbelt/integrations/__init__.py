"""Integrations with other trainers. ``KLMonitorCallback`` (Hugging Face transformers / TRL)
is imported lazily, so ``import klbelt.integrations`` does not import transformers."""

__all__ = ["KLMonitorCallback"]


def __getattr__(name):
    if name == "KLMonitorCallback":
        from .hf import KLMonitorCallback

        return KLMonitorCallback
    raise AttributeError(f"module 'klbelt.integrations' has no attribute {name!r}")
