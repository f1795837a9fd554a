"""Sparse upcycling: a pure transform from a trained dense model's weights to an MoE's initial weights.

Legend: D model dim, F dense FFN hidden dim, G granularity (each dense FFN split into G finer experts),
Fe = F / G expert hidden dim, P fused input projections (2 for SwiGLU/GeGLU, 3 for OpenMoE's unit),
E routed experts of one MoE layer.

Expert e of an MoE block is slice (e mod G) of that block's dense FFN (the whole FFN when G = 1), then
optionally perturbed: Gaussian noise on a share of its entries, or Drop-Upcycling's partial
re-initialisation (a share r of its hidden neurons redrawn from the dense matrix's mean and std).
Attention, norms, embeddings, the head and the blocks that stay dense are copied; the dense FFN may be
kept as a shared expert; the router starts at N(0, std) or at zero. With G = 1, no noise, no shared
expert, renormalised top-k weights and no drops, each MoE block computes sum_k w_k FFN(x) = FFN(x), so
the upcycled model is the dense model (function preservation); `relative_output_change` measures how
far the chosen options move it away from that.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from moelab.config import Config, ConfigError, check_seed, require
from moelab.model.config import FFN_IN_PROJECTIONS, ModelConfig

# Router kinds whose weights are fixed tables (hash, frozen random): their seeded values are kept.
FIXED_ROUTERS = ("hash", "random")


@dataclasses.dataclass(kw_only=True)
class UpcycleConfig(Config):
    granularity: int = 1  # G: each dense FFN splits into G experts of hidden F / G
    noise_std: float = 0.0  # noise added to experts, in units of each dense matrix's std
    noise_share: float = 1.0  # share of entries that get the noise
    reinit_ratio: float = 0.0  # Drop-Upcycling: share of each expert's hidden neurons redrawn
    shared_expert: bool = False  # keep the dense FFN as a shared expert
    router_init: Literal["normal", "zero"] = "normal"
    router_std: float = 0.02
    seed: int = 0

    def validate(self) -> None:
        require(self.granularity >= 1, f"upcycle.granularity={self.granularity} must be >= 1")
        require(self.noise_std >= 0, f"upcycle.noise_std={self.noise_std} must be >= 0")
        require(0 <= self.noise_share <= 1, f"upcycle.noise_share={self.noise_share} must be in [0, 1]")
        require(0 <= self.reinit_ratio <= 1, f"upcycle.reinit_ratio={self.reinit_ratio} must be in [0, 1]")
        require(self.router_init in ("normal", "zero"),
                f"upcycle.router_init={self.router_init!r} is unknown (allowed: normal, zero)")
        require(self.router_std >= 0, f"upcycle.router_std={self.router_std} must be >= 0")
        check_seed(self.seed, "upcycle.seed")


def upcycled_config(dense: ModelConfig, moe_table: dict, opts: UpcycleConfig) -> ModelConfig:
    """The MoE config: the dense model's config with the preset's [model.moe] table, the experts' width
    set by the granularity and the shared expert by `opts.shared_expert`."""
    if dense.is_moe:
        raise ConfigError("the checkpoint to upcycle is already an MoE model (model.moe.num_experts > 0)")
    F_, G = dense.ffn_hidden, opts.granularity
    require(F_ % G == 0, f"upcycle.granularity={G} must divide the dense ffn_hidden={F_}")
    moe = dict(moe_table)
    moe["expert_hidden"] = F_ // G  # the preset's width would not fit a slice of the dense FFN
    if opts.shared_expert:
        moe.update(num_shared_experts=1, shared_hidden=F_, shared_gate=False)
        if moe.get("shared_placement", "parallel") == "none":
            moe["shared_placement"] = "parallel"
    else:
        moe["num_shared_experts"] = 0
    cfg = ModelConfig.from_dict({**dense.to_dict(), "moe": moe}, path="model")
    require(cfg.is_moe, "the MoE preset has model.moe.num_experts = 0: nothing to upcycle into")
    bad = [e for e in cfg.experts_per_layer() if e % G]
    require(not bad, f"upcycle.granularity={G} must divide model.moe.num_experts ({bad[0] if bad else 0})")
    return cfg


def _slice(w_in_DX: torch.Tensor, w_out_FD: torch.Tensor, P: int, c: int, Fe: int):
    """Hidden neurons c*Fe .. (c+1)*Fe of a dense FFN: the same columns of each of the P input slices."""
    F_ = w_out_FD.shape[0]
    cols = [w_in_DX[:, p * F_ + c * Fe: p * F_ + (c + 1) * Fe] for p in range(P)]
    return torch.cat(cols, dim=1), w_out_FD[c * Fe:(c + 1) * Fe]


def _noised(w: torch.Tensor, ref_std: float, opts: UpcycleConfig, g: torch.Generator) -> torch.Tensor:
    if opts.noise_std == 0 or opts.noise_share == 0:
        return w
    hit = torch.rand(w.shape, generator=g) < opts.noise_share
    return w + hit * torch.randn(w.shape, generator=g) * (opts.noise_std * ref_std)


def _reinit(w_in_DX, w_out_FD, ref_in, ref_out, P: int, ratio: float, g: torch.Generator):
    """Drop-Upcycling: redraw a share of hidden neurons (their input columns and output row) from each
    dense matrix's own mean and std (gate, up, down), so experts start partly different while keeping
    most of the FFN."""
    Fe, F_ = w_out_FD.shape[0], ref_out.shape[0]
    n = round(ratio * Fe)
    if n == 0:
        return w_in_DX, w_out_FD
    idx = torch.randperm(Fe, generator=g)[:n]
    w_in_DX, w_out_FD = w_in_DX.clone(), w_out_FD.clone()
    for p in range(P):
        ref = ref_in[:, p * F_:(p + 1) * F_]
        fresh_Dn = torch.randn(w_in_DX.shape[0], n, generator=g)
        w_in_DX[:, p * Fe + idx] = fresh_Dn * float(ref.std()) + float(ref.mean())
    w_out_FD[idx] = torch.randn(n, w_out_FD.shape[1], generator=g) * float(ref_out.std()) + float(ref_out.mean())
    return w_in_DX, w_out_FD


def _experts(w_in_DX, w_out_FD, E: int, cfg: ModelConfig, opts: UpcycleConfig, g: torch.Generator):
    """Expert e's (w_in [D, P*Fe], w_out [Fe, D]) for e = 0..E-1, drawn in that order."""
    P, G = FFN_IN_PROJECTIONS[cfg.ffn_kind], opts.granularity
    Fe = w_out_FD.shape[0] // G
    s_in, s_out = float(w_in_DX.std()), float(w_out_FD.std())
    for e in range(E):
        a_DX, b_FD = _slice(w_in_DX, w_out_FD, P, e % G, Fe)
        if opts.reinit_ratio > 0:
            a_DX, b_FD = _reinit(a_DX, b_FD, w_in_DX, w_out_FD, P, opts.reinit_ratio, g)
        a_DX = _noised(a_DX, s_in, opts, g)
        yield a_DX, _noised(b_FD, s_out, opts, g)


def _router_value(fresh: torch.Tensor, cfg: ModelConfig, opts: UpcycleConfig,
                  g: torch.Generator) -> torch.Tensor:
    """Matrices of a trainable router start at N(0, std) or zero; scalars and buffers stay as built."""
    if cfg.moe.router.kind in FIXED_ROUTERS or fresh.dim() < 2 or not fresh.is_floating_point():
        return fresh
    if opts.router_init == "zero":
        return torch.zeros_like(fresh)
    return torch.randn(fresh.shape, generator=g) * opts.router_std


def _upcycled(dense_sd: dict[str, torch.Tensor], moe_cfg: ModelConfig, opts: UpcycleConfig,
              fresh_sd: dict[str, torch.Tensor]):
    """(name, expert or None, value) for every tensor of the MoE, in the order the random draws are made."""
    g = torch.Generator().manual_seed(opts.seed)
    moe_ids = dict(zip(moe_cfg.moe_layer_ids(), moe_cfg.experts_per_layer()))
    for name, fresh in fresh_sd.items():
        parts = name.split(".")
        if name in dense_sd and dense_sd[name].shape == fresh.shape:
            yield name, None, dense_sd[name]  # attention, norms, embeddings, head, dense blocks
        elif ".moe.router." in name or name.startswith("router_core."):
            yield name, None, _router_value(fresh, moe_cfg, opts, g)
        elif ".shared." in name and parts[-1] in ("w_in_DX", "w_out_FD"):
            yield name, None, dense_sd[f"blocks.{parts[1]}.ffn.{parts[-1]}"]
        elif ".moe.experts." in name:
            continue  # below, both matrices at once
        else:
            raise ConfigError(f"upcycling has no source for tensor {name}")
    for i, E in moe_ids.items():
        ffn = f"blocks.{i}.ffn."
        for e, (w_in, w_out) in enumerate(_experts(dense_sd[ffn + "w_in_DX"], dense_sd[ffn + "w_out_FD"], E,
                                                   moe_cfg, opts, g)):
            yield f"blocks.{i}.moe.experts.w_in_EDX", e, w_in
            yield f"blocks.{i}.moe.experts.w_out_EFD", e, w_out


def upcycle_state_dict(dense_sd: dict[str, torch.Tensor], dense_cfg: ModelConfig, moe_cfg: ModelConfig,
                       opts: UpcycleConfig, fresh_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MoE state dict. `fresh_sd` is a freshly built MoE model's state dict: it gives the key set and
    the values upcycling does not decide (router scalars and buffers, fixed router tables)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}
    for name, e, value in _upcycled(dense_sd, moe_cfg, opts, fresh_sd):
        if e is None:
            out[name] = value.clone() if value is not fresh_sd[name] else value
        else:
            experts.setdefault(name, []).append(value)
    out.update({name: torch.stack(values) for name, values in experts.items()})
    return out


@torch.no_grad()
def upcycle_into(model: torch.nn.Module, dense_sd: dict[str, torch.Tensor], moe_cfg: ModelConfig,
                 opts: UpcycleConfig) -> None:
    """upcycle_state_dict's values written into the freshly built `model` itself, tensor by tensor and
    expert by expert, the random draws in the same order: no second MoE-sized state dict and no stack of a
    layer's experts exist (2.35x the MoE's fp32 size at the peak before)."""
    target = model.state_dict()  # the model's own tensors
    for name, e, value in _upcycled(dense_sd, moe_cfg, opts, target):
        dst = target[name] if e is None else target[name][e]
        if value is not dst:
            dst.copy_(value)


def breaks_function(cfg: ModelConfig, opts: UpcycleConfig) -> list[str]:
    """The options that make the upcycled model compute something other than the dense model."""
    m, r = cfg.moe, cfg.moe.router
    why = [f"granularity={opts.granularity}"] * (opts.granularity > 1)
    why += ["noise"] * (opts.noise_std > 0 and opts.noise_share > 0)
    why += ["reinit_ratio"] * (opts.reinit_ratio > 0)
    why += ["shared expert"] * opts.shared_expert
    why += ["top-k weights not renormalised"] * (not r.renormalize and min(cfg.experts_per_layer()) > m.top_k)
    why += ["capacity drops"] * (m.capacity_factor_train is not None or m.capacity_factor_eval is not None)
    why += ["routed_scaling_factor"] * (r.routed_scaling_factor != 1.0)
    return why


@torch.no_grad()
def relative_output_change(dense_logits: torch.Tensor, moe_logits: torch.Tensor) -> float:
    """||moe - dense|| / ||dense|| over all logits: 0 when upcycling preserved the function."""
    d = dense_logits.double()
    return float((moe_logits.double() - d).norm() / d.norm().clamp_min(1e-30))


@torch.no_grad()
def expert_cosine(model) -> dict[str, float]:
    """Per MoE layer (moe0, moe1, ... as in the routing metrics), the mean pairwise cosine between the
    experts' flattened weights (1 for exact copies): how far upcycled copies have diverged, OpenMoE's
    symmetry-breaking worry. With granularity G > 1 only experts e and e + G start as copies."""
    out = {}
    for i, layer in enumerate(model.moe_layers()):
        ex = layer.experts
        E = ex.num_experts
        if E < 2:
            continue
        gram_EE = _gram([ex.w_in_EDX, ex.w_out_EFD], E)
        norm_E = gram_EE.diagonal().sqrt().clamp_min(1e-300)
        cos_EE = gram_EE / norm_E[:, None] / norm_E[None, :]
        off = cos_EE.sum() - cos_EE.diagonal().sum()
        out[f"moe{i}/expert_cosine"] = float(off / (E * (E - 1)))
    return out


def _gram(weights: list[torch.Tensor], E: int, chunk: int = 1 << 22) -> torch.Tensor:
    """[E, E] dot products of the experts' flattened weights, summed in fp64 over column blocks of about
    `chunk` values: a whole fp64 copy of a layer's experts (12 GiB for openmoe-8b-32e) never exists."""
    gram_EE = torch.zeros(E, E, dtype=torch.float64, device=weights[0].device)
    for w in weights:
        for block in w.detach().reshape(E, -1).split(max(1, chunk // E), dim=1):
            b64 = block.double()
            gram_EE += b64 @ b64.t()
    return gram_EE
