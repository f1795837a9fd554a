"""Scale profiles for the claims table: `cpu` (today's default) and `gpu`, sized per row group.

A row group is the rows that share trained models (`GROUPS`, by the module the row lives in): the base
runs (3 seeds of tiny-moe and tiny-dense), the drop rows' tiny-moe at 2048 tokens per sequence, the 8-layer RMoE models (4 router variants x 3 seeds, which
the Closer Look and OLMoE per-layer rows reuse), RMoE's depth scan (2 and 4 blocks beside the 8-block
runs, at the rmoe8 group's steps so that depth 8 is the same cache entry), the dense-reference upcycling
at 8 blocks, and upcycling. Every row module is named: a row sized by another group's scale would train
its shared runs at other steps (another cache key at the same folder: the runs are retrained, and the
rows that share them no longer read one model). On a GPU each group is meant as one run of at most 8
minutes on one H200, corpus build included (a fresh machine has no cache).

The GPU sizes rest on ASSUMED speeds (`ASSUMED`), not measured ones: no GPU was lent when they were
set. They are deliberately slow guesses. The tiny models are launch-bound on a GPU (d_model 128: a step's
GEMMs take microseconds), so the assumption is a time per optimizer step, nearly independent of the batch;
the token count then follows from the batch. Anchor: openmoe-base-16e (24 blocks, 0.35B active) ran
212 ms per 16,384-token step on an H200 (77,171 tokens/s, issue 20); a 4-block model of d_model 128 has
a sixth of its launches and a thousandth of its FLOPs per token. `plan_lines` prints each group's planned
tokens and estimated minutes so a GPU user can check them before the device time is spent, and each
row's result records its wall time, which is how the first GPU run corrects these numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moelab.claims.workspace import Scale
from moelab.config import MoelabError

PROFILES = ("cpu", "gpu")
# group -> the row modules whose rows it holds
GROUPS = {
    "base": ("rows_openmoe", "rows_olmoe", "rows_intervene"),
    "long": ("rows_turns", "rows_chatdrop"),
    "rmoe8": ("rows_rmoe", "rows_closer", "rows_layers"),
    "depth": ("rows_depth",),
    "denseref": ("rows_denseref",),
    "upcycle": ("rows_upcycle",),
}
GPU_BUDGET_MIN = 8.0

# One H200, bf16 autocast (train.dtype=auto on CUDA). ASSUMED, not measured (see the module docstring).
ASSUMED = {
    # s per optimizer step at 128 x 256 tokens; launch-bound, so by blocks: the 2- and 4-block RMoE of the
    # depth scan at about the 4-block tiny models' time and two thirds of it
    "step_s": {"tiny": 0.060, "rmoe8": 0.100, "rmoe4": 0.060, "rmoe2": 0.040,
               # the drop rows' tiny-moe at 2048 tokens per sequence, 16 x 2048 per step: attention over 8x
               # longer rows, no longer launch-bound
               "long": 0.120},
    "corpus_build_s": 150.0,  # python-large: read, split docstrings, train BPE, tokenize (16 cores)
    "per_run_s": 4.0,  # model build, end-of-run evaluation, checkpoints
    "device_tokens_per_s": 1_000_000,  # tracing forward (fp32) + Parquet writing
    "cpu_tokens_per_s": {"tiny": 100_000, "rmoe8": 40_000},  # the rows' held-out losses (on the CPU, 16 cores)
    "analysis_rows_per_s": 200_000,  # measured: 10M trace rows in 44.6 s on one core here (PERFORMANCE.md)
}
# python-large's held-out split: 0.2% of ~55M tokens (extrapolated from a 10% sample built on this machine,
# docs/claims-gpu/README.md); the plan uses it before the corpus exists.
HELDOUT_TOKENS = 110_000

_GPU_COMMON = dict(seq_len=256, batch_size=128, vocab_size=4096, eval_tokens=32768, trace_tokens=0, seeds=3,
                   corpus="python-large", corpus_bytes=0, corpus_math=200_000)
GPU_STEPS = {"base": 480, "long": 480, "rmoe8": 120, "depth": 120, "denseref": 480, "upcycle": 480}  # depth: rmoe8's


def group_of(module: str) -> str:
    """The group of a row by the module that registers it ("moelab.claims.rows_rmoe" -> "rmoe8")."""
    short = module.rsplit(".", 1)[-1]
    for group, modules in GROUPS.items():
        if short in modules:
            return group
    # No default: a silent "base" sized the 8-layer rows by the base runs' steps at the gpu scale.
    raise MoelabError(f"row module {short!r} is in no row group of claims/scale.py (GROUPS)")


def scale_for(profile: str, group: str = "base", *, smoke: bool = False) -> Scale:
    """The Scale a row of `group` runs at under `profile`; `smoke` shrinks it to seconds, keeping the
    profile's code path (the gpu profile's smoke builds its python-large corpus from a few hundred KB)."""
    if profile not in PROFILES:
        raise MoelabError(f"unknown scale {profile!r} (known: {', '.join(PROFILES)})")
    if group not in GROUPS:
        raise MoelabError(f"unknown row group {group!r} (known: {', '.join(GROUPS)})")
    if profile == "cpu":
        return Scale.smoke() if smoke else Scale()
    if smoke:
        # The whole held-out split is traced (a few thousand tokens here): a 2048-token prefix can hold one
        # source file and so one domain, which the domain rows cannot measure.
        return dataclasses.replace(Scale.smoke(), corpus="python-large", corpus_bytes=300_000, corpus_math=300,
                                   trace_tokens=0)
    return Scale(steps=GPU_STEPS[group], **_GPU_COMMON)


def expand_groups(names: list[str]) -> list[str]:
    """`--only` names with each group name replaced by its rows (row names pass through)."""
    from moelab.claims.registry import all_rows

    rows = all_rows()
    out = []
    for n in names:
        if n in GROUPS:
            out += [r.name for r in rows.values() if group_of(r.fn.__module__) == n]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


# ---- the plan: tokens and estimated time per group ---------------------------------------------------------
def workload(group: str, s: Scale, heldout: int = HELDOUT_TOKENS) -> dict:
    """What the group's rows compute, counted from the rows' code: training tokens and steps per model
    kind, traced tokens (tracing runs on the device), held-out tokens evaluated on the CPU, trace rows."""
    per_run = s.steps * s.batch_size * s.seq_len
    held = s.trace_tokens or heldout
    if group == "base":  # 3+3 runs; seed 0's 10 checkpoints, seeds 1.. final and early snapshots traced
        runs = {"tiny": 2 * s.seeds}
        traced = (10 + 3 * (s.seeds - 1)) * held
        cpu = {"tiny": 2 * s.seeds * heldout + 2 * s.seeds * 18 * s.eval_tokens}  # losses; expert ablations
        rows = traced * 2 * 2  # 2 MoE blocks, top-2
    elif group == "long":  # a 2048-token tiny-moe per seed; its final traced on the main and turns held-out
        runs = {"long": s.seeds}
        traced = s.seeds * (held + min(held, 200_000))
        cpu = {"tiny": 0}
        rows = traced * 2 * 2
    elif group == "rmoe8":  # 4 router variants x seeds; 3 loss rows of 2 variants; MI traces; all-expert traces
        runs = {"rmoe8": 4 * s.seeds}
        traced = 2 * s.seeds * held + s.seeds * 16384
        cpu = {"rmoe8": 3 * 2 * s.seeds * heldout}
        rows = traced * 8 * 2 + s.seeds * held * 8 * 2  # + the OLMoE per-layer rows' analysis of linear
    elif group == "depth":  # linear and GRU at each depth x seeds (depth 8: the rmoe8 runs); held-out losses
        from moelab.claims.rows_depth import DEPTHS

        runs = {f"rmoe{d}": 2 * s.seeds for d in DEPTHS}
        traced, rows = 0, 0
        cpu = {"rmoe8": len(DEPTHS) * 2 * s.seeds * heldout}  # every depth costed as 8 blocks
    elif group == "denseref":  # per seed: 8-block dense half + upcycled MoE half = 1 run of steps; every expert
        from moelab.claims.rows_denseref import TOKENS  # and the dense FFN on TOKENS held-out tokens

        runs = {"rmoe8": s.seeds}
        traced, rows = 0, 0
        cpu = {"rmoe8": s.seeds * min(s.trace_tokens or TOKENS, TOKENS) * 9}  # 16 experts of 2 active: ~8x
    elif group == "upcycle":  # per seed: dense half + upcycled half + scratch whole = 2 runs of steps
        runs = {"tiny": 2 * s.seeds}
        traced = 2 * s.seeds * held
        cpu = {"tiny": 0}
        rows = traced * 2 * 2
    else:
        raise MoelabError(f"unknown row group {group!r} (known: {', '.join(GROUPS)})")
    shape = (s.batch_size, s.seq_len)
    if group == "long":
        from moelab.claims.rows_turns import LONG_SEQ, long_batch

        shape = (long_batch(s), LONG_SEQ)
    return {"runs": runs, "steps": s.steps, "tokens_per_run": per_run, "shape": shape,
            "train_tokens": sum(runs.values()) * per_run, "traced_tokens": traced, "cpu_tokens": cpu,
            "trace_rows": rows}


def estimate_seconds(w: dict, assumed: dict = ASSUMED, *, corpus_build: bool = True) -> dict:
    """Seconds per part of a group's run on one H200 under `assumed` (batch 128 x 256; the tiny models'
    step time is taken as independent of the batch up to that size)."""
    train = sum(n * w["steps"] * assumed["step_s"][kind] for kind, n in w["runs"].items())
    parts = {"corpus": assumed["corpus_build_s"] if corpus_build else 0.0,
             "training": train,
             "runs_fixed": sum(w["runs"].values()) * assumed["per_run_s"],
             "tracing": w["traced_tokens"] / assumed["device_tokens_per_s"],
             "cpu_evaluation": sum(n / assumed["cpu_tokens_per_s"][k] for k, n in w["cpu_tokens"].items()),
             "analysis": w["trace_rows"] / assumed["analysis_rows_per_s"]}
    parts["total"] = sum(parts.values())
    return parts


def plan_lines(profile: str, groups: list[str] | None = None) -> list[str]:
    """Human lines: per group the planned tokens and the estimated minutes on one H200."""
    groups = groups or list(GROUPS)
    out = []
    for g in groups:
        s = scale_for(profile, g)
        w = workload(g, s)
        runs = ", ".join(f"{n} {k}" for k, n in w["runs"].items())
        line = (f"{g}: {runs} runs x {w['steps']} steps x {w['shape'][0]} x {w['shape'][1]} = "
                f"{w['tokens_per_run'] / 1e6:.1f}M tokens per run, {w['train_tokens'] / 1e6:.0f}M in all")
        if profile == "gpu":
            line += f"; {w['traced_tokens'] / 1e6:.1f}M tokens traced"
            e = estimate_seconds(w)
            line += (f"; estimated {e['total'] / 60:.1f} min on one H200 (training {e['training'] / 60:.1f}, corpus "
                     f"{e['corpus'] / 60:.1f}, rest {(e['total'] - e['training'] - e['corpus']) / 60:.1f}) "
                     f"under the assumed step times {ASSUMED['step_s']} s")
        out.append(line)
    return out


# ---- the device and the gpu results' provenance --------------------------------------------------------------
def check_device(name: str | None) -> None:
    """None, cpu, cuda or cuda:N that this machine has; anything else is one clear error."""
    if name is None:
        return
    import torch

    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise MoelabError(f"--device {name!r} is unknown (allowed: cpu, cuda, cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MoelabError(f"--device {name}: CUDA is not available here")
    if index and int(index) >= torch.cuda.device_count():
        raise MoelabError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def device_name(device: str | None) -> str:
    import torch

    from moelab.train.loop import resolve_device

    dev = resolve_device(device or "auto")
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({dev})"


ABOUT = "about"  # a subfolder: read_results reads every *.json of the results folder as a row


def write_about(folder: str | Path, spaces: dict, device: str | None, took: dict | None = None) -> list[Path]:
    """about/GROUP.json beside the gpu results: the device, date, torch, sizes and the corpus (fingerprint,
    versions, tokens) each group ran with, and its rows' wall time against the plan's estimate (what
    corrects `ASSUMED`); groups run on other days or machines keep their own file."""
    import datetime
    import json

    import torch

    from moelab.claims.record import write_text_atomic
    from moelab.data.corpus_large import read_manifest

    out = []
    for group, ws in spaces.items():
        s = ws.scale
        man = read_manifest(ws.corpus()) or {}
        held = (man.get("tokens") or {}).get("heldout") or HELDOUT_TOKENS
        about = {"group": group, "device": device_name(device), "torch": torch.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "scale": dataclasses.asdict(s), "describe": s.describe(), "plan": plan_lines("gpu", [group])[0],
                 "rows_wall_min": round(took[group] / 60, 2) if took and group in took else None,
                 "estimated_min": round(estimate_seconds(workload(group, s, held))["total"] / 60, 2),
                 "corpus": {k: man.get(k) for k in ("fingerprint", "recipe", "versions", "num_files", "num_bytes",
                                                     "dropped", "tokens", "per_domain_tokens")}}
        path = Path(folder) / ABOUT / f"{group}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(about, indent=1) + "\n")  # read_gpu reads every about/*.json
        out.append(path)
    return out


def read_gpu(folder: str | Path) -> tuple[dict, str]:
    """(the gpu results, a caption naming each group's device, date and corpus), or ({}, "") when none."""
    from moelab.claims.record import read_results

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.json")):
        return {}, ""
    said = "; ".join(_about_line(p) for p in sorted((folder / ABOUT).glob("*.json")))
    return read_results(folder), f"GPU scale ({said or 'no about/ files: device and date unknown'})."


def _about_line(path: Path) -> str:
    """One group's provenance from its about/GROUP.json; a damaged file is one clear error."""
    import json

    try:
        a = json.loads(path.read_text())
        return (f"{a['group']}: {a['device']}, {a['date']}, torch {a['torch']}, {a['describe']}, corpus "
                f"python-large {a['corpus']['fingerprint']}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MoelabError(f"{path} is not a gpu group's about file ({type(e).__name__}: {e})") from None
