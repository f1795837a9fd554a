"""`moelab upcycle`: write an MoE checkpoint initialised from a trained dense checkpoint, and the
diagnostic the trainer logs when a run starts from it (`train --init`).

The transform itself is `model/upcycle.py` (a pure function on state dicts); this file reads and writes
checkpoints. The MoE preset contributes its [model.moe] table only: every other model field comes from
the dense checkpoint, so attention, norms and embeddings fit by construction. Options come from an
[upcycle] table or `--set upcycle.FIELD=VALUE`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.config import ConfigError, MoelabError

# torch and the transform are imported where they are used: every `moelab` verb imports this module to
# build its parser, and parsing must not pay for torch.

STATE_KEY = "upcycle"  # the state.json entry that marks an upcycled checkpoint


def register(sub) -> None:
    p = sub.add_parser("upcycle", help="initialise an MoE checkpoint from a trained dense checkpoint")
    p.add_argument("checkpoint", help="the dense checkpoint folder (or a run folder: its last checkpoint)")
    p.add_argument("--preset", required=True, help="MoE preset (or .toml): its [model.moe] table is used")
    p.add_argument("--out", required=True, help="folder for the upcycled checkpoint (must not exist or be empty)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="model.moe.* or upcycle.* (granularity, noise_std, noise_share, reinit_ratio, "
                        "shared_expert, router_init, router_std, seed)")
    p.set_defaults(func=run_upcycle)


def _options(preset: str, overrides: list[str]) -> tuple[dict, Any]:
    from moelab.model.upcycle import UpcycleConfig
    from moelab.presets import load_preset_dict

    for text in overrides:
        if not text.split("=", 1)[0].strip().startswith(("model.moe.", "upcycle.")):
            raise ConfigError(f"--set {text!r}: upcycle takes model.moe.* and upcycle.* settings only "
                              "(the other model fields are the dense checkpoint's)")
    d = load_preset_dict(preset, overrides)
    moe = d.get("model", {}).get("moe")
    if not isinstance(moe, dict):
        raise ConfigError(f"preset {preset!r} has no [model.moe] table to upcycle into")
    return moe, UpcycleConfig.from_dict(d.get("upcycle", {}), path="upcycle")


def upcycle_checkpoint(dense_path: str | Path, preset: str, out: str | Path,
                       overrides: list[str] = ()) -> Path:
    """Write the upcycled checkpoint (weights, the dense run config with the MoE model, step 0)."""
    from moelab.model.transformer import build_model
    from moelab.model.upcycle import breaks_function, upcycle_into, upcycled_config
    from moelab.train.checkpoint import load_model, read_checkpoint_config, save_checkpoint

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoelabError(f"--out {out} already exists and is not an empty folder: choose another")
    from moelab.outpath import check_writable_dir

    check_writable_dir(out)  # before the work, and without save_checkpoint's "earlier checkpoints" wording
    moe_table, opts = _options(preset, list(overrides))
    dense = load_model(dense_path)
    cfg = upcycled_config(dense.config, moe_table, opts)
    check_fits_in_memory(cfg, dense.config.num_params())  # before the MoE's weights are allocated
    model = build_model(cfg, seed=opts.seed)
    upcycle_into(model, dense.state_dict(), cfg, opts)
    run_config = {k: v for k, v in read_checkpoint_config(dense_path).items() if k != "format"}
    run_config["model"] = cfg.to_dict()
    record = {"dense": str(Path(dense_path).resolve()), "options": opts.to_dict(),
              "breaks_function": breaks_function(cfg, opts)}
    return save_checkpoint(out, model, run_config, 0, extra={STATE_KEY: record})


def upcycle_bytes(moe_params: int, dense_params: int) -> int:
    """Peak memory of `upcycle_checkpoint`, fp32: the dense model, the MoE model (its values are written in
    place, expert by expert) and what saving it takes. Measured peak-RSS growth beyond the dense model,
    E = 8 and 32: 1.10-1.12 x the MoE's fp32 bytes with safetensors 0.8, which writes from the tensors'
    own memory; 1.5 x is counted. A safetensors that serialises every tensor to bytes first (one without
    `_flatten_as_ptr`) holds one more MoE-sized copy: 2.5 x there."""
    import safetensors.torch

    per_param = 6 if hasattr(safetensors.torch, "_flatten_as_ptr") else 10
    return 4 * dense_params + per_param * moe_params


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit (a container's);
    None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits_in_memory(cfg, dense_params: int, available: int | None = None) -> None:
    """Refuse in one line an upcycle whose analytic size cannot fit in the memory available now."""
    need = upcycle_bytes(cfg.num_params(), dense_params)
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise MoelabError(f"upcycling into {cfg.num_params():,} parameters ({cfg.moe.num_experts} experts) needs "
                          f"about {need / 2**30:.1f} GiB of memory (the dense and MoE models and what saving "
                          f"takes, fp32), but {available / 2**30:.1f} GiB is available: use fewer experts")


def run_upcycle(args) -> int:
    from moelab.train.rundir import resolve_checkpoint

    dense = resolve_checkpoint(args.checkpoint)
    out = upcycle_checkpoint(dense, args.preset, args.out, args.set)
    record = upcycle_record(out)
    why = ", ".join(record["breaks_function"]) or "none: the MoE computes the dense model's function"
    print(f"upcycled {dense} -> {out}\noptions that change the function: {why}")
    return 0


def upcycle_record(ckpt: str | Path) -> dict | None:
    """The upcycling record of a checkpoint written by `upcycle_checkpoint`, or None."""
    state = Path(ckpt) / "state.json"
    try:
        record = json.loads(state.read_text()).get(STATE_KEY) if state.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise MoelabError(f"{state} is corrupt (not a JSON object)") from None
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("dense"), str)):
        raise MoelabError(f"{state}: {STATE_KEY!r} should be an object naming its dense checkpoint")
    return record


def step0_change(ckpt: str | Path, model, ids_BS: Any) -> dict | None:
    """For a run started from an upcycled checkpoint: how far its logits on the first batch are from
    the dense model's (eval mode: no jitter, the eval capacity). None for other checkpoints."""
    import torch

    from moelab.model.upcycle import relative_output_change
    from moelab.train.checkpoint import load_model

    record = upcycle_record(ckpt)
    if record is None:
        return None
    out = {"breaks_function": ", ".join(record.get("breaks_function", [])) or "none"}
    if not (Path(record["dense"]) / "model.safetensors").is_file():
        out["rel_output_change"] = None  # the dense checkpoint has moved: nothing to compare with
        return out
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # building the dense model draws an init: leave the run's RNG be
        dense = load_model(record["dense"], device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out["rel_output_change"] = relative_output_change(dense(ids_BS).logits, model(ids_BS).logits)
    model.train(was_training)
    return out
