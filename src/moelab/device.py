"""The device rule of every verb that runs a model (`train.device`, `--device`): an unparseable, unknown or
absent device is one line (exit 2), never torch's RuntimeError or "Torch not compiled with CUDA enabled"."""

from __future__ import annotations

from moelab.config import MoelabError

DEVICE_KINDS = ("cpu", "cuda", "mps")
ALLOWED = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(name: str | None, what: str = "train.device"):
    """The torch.device `name` means here (auto or None: cuda when present, else cpu). `what` names the
    setting in messages: a config field (train.device) or a flag (--device)."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = f"{what} {name!r}" if what.startswith("-") else f"{what}={name!r}"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_KINDS:
        raise MoelabError(f"{label} is unknown (allowed: {ALLOWED})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MoelabError(f"{label} but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoelabError(f"{label} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MoelabError(f"{label} but MPS is not available here")
    return dev
