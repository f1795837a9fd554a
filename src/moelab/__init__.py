"""moelab: build, train and dissect Mixture-of-Experts language models."""

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "moelab.model.config",
    "MoEConfig": "moelab.model.config",
    "RouterConfig": "moelab.model.config",
    "load_preset": "moelab.presets",
    "list_presets": "moelab.presets",
    "build_model": "moelab.model.transformer",
    "MoETransformer": "moelab.model.transformer",
    "load_model": "moelab.train.checkpoint",
}


def __getattr__(name):
    # Imported lazily so `import moelab` (and the CLI's start-up) stays cheap and torch-free.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
