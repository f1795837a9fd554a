"""The router zoo. Every router returns its decision as a `Routing` value.

Legend: T tokens, D model dim, E experts, K experts per token, P recurrent/projection width.

Routers score in fp32 (OpenMoE keeps the router in fp32), turn logits into scores (a softmax over all E
experts, or DeepSeek-V3's per-expert sigmoid) and pick the top k, optionally only within the best
`topk_group` of `n_group` expert groups (DeepSeek-V3's group-limited routing) and with a selection-only
bias (aux-loss-free balancing; DeepSeek-V3's e_score_correction_bias is the same buffer). A recurrent
router (RMoE) also returns the state the decoder must hand to the next MoE layer of the same token;
stateless routers return `state=None`.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.model.config import ModelConfig, RouterConfig


class Routing(NamedTuple):
    expert_ids_TK: torch.Tensor  # int64, experts in rank order (rank 0 = highest score)
    weights_TK: torch.Tensor  # fp32 combine weights, before any capacity dropping
    logits_TE: torch.Tensor  # fp32 router logits
    probs_TE: torch.Tensor  # fp32 scores of all experts: softmax(logits), or sigmoid(logits) (score="sigmoid")
    state: Any  # recurrent state for the next MoE layer, or None


def top_k_stable(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids in rank order; exact ties go to the lower expert index (torch.topk does not promise that)."""
    if torch.compiler.is_compiling():  # a compiled graph cannot branch on data
        return keyed_top_k(scores_TE, k)
    if scores_TE.device.type != "cpu" or k >= scores_TE.shape[-1]:
        # Finding the tied rows needs a host sync, which a GPU pays more for than for the sort itself.
        return _sorted_top_k(scores_TE, k)
    # torch.topk is ~3x faster than a full stable sort of 64 scores; only a row with two equal values
    # among its k + 1 largest can come out in a different order, so those rows alone are sorted.
    vals_TK1, ids_TK1 = torch.topk(scores_TE, k + 1, dim=-1)
    tied_T = (vals_TK1[:, 1:] == vals_TK1[:, :-1]).any(-1)
    ids_TK = ids_TK1[:, :k]
    if tied_T.any():
        rows_R = tied_T.nonzero().squeeze(1)
        ids_TK = ids_TK.index_copy(0, rows_R, _sorted_top_k(scores_TE.index_select(0, rows_R), k))
    return ids_TK


def _sorted_top_k(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def keyed_top_k(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_stable` without a sort or a branch: torch.topk of int64 keys that are all distinct, the
    fp32 score's bits made monotone (negative floats flip their magnitude bits) times E, plus E - 1 - e
    so that equal scores rank the lower expert first. 2x faster than the stable sort at 4096 x 64, k 6
    on one CPU thread. Adding 0.0 turns -0.0 into +0.0, which compare equal."""
    E = scores_TE.shape[-1]
    bits_TE = (scores_TE.float() + 0.0).view(torch.int32)
    ordered_TE = torch.where(bits_TE < 0, bits_TE ^ 0x7FFFFFFF, bits_TE).long()
    key_TE = ordered_TE * E + (E - 1 - torch.arange(E, device=scores_TE.device))
    return (E - 1) - torch.topk(key_TE, k, dim=-1).values.remainder(E)


def group_limited(select_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited selection scores: experts outside each token's best `topk_group` of
    `n_group` equal groups get -inf. A group's score is the sum of its two best selection scores (its
    best one when a group holds a single expert)."""
    T, E = select_TE.shape
    grouped_TGM = select_TE.view(T, n_group, E // n_group)
    group_TG = grouped_TGM.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, top_k_stable(group_TG, topk_group), True)
    return select_TE.masked_fill(~keep_TG.repeat_interleave(E // n_group, dim=1), float("-inf"))


class Router(nn.Module, abc.ABC):
    """Shared selection logic: subclasses implement `score`."""

    def __init__(self, rcfg: RouterConfig, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.jitter = rcfg.renormalize, rcfg.jitter
        self.bias_update_rate = rcfg.bias_update_rate if rcfg.bias_balance else 0.0
        # Aux-loss-free balancing shifts selection only; a buffer so it is saved but never trained.
        # With bias_balance and a zero update rate it is a fixed correction bias (an imported DeepSeek-V3's).
        self.register_buffer("selection_bias_E", torch.zeros(num_experts), persistent=rcfg.bias_balance)
        self.use_bias = rcfg.bias_balance
        self.score_fn, self.n_group, self.topk_group = rcfg.score, rcfg.n_group, rcfg.topk_group
        self.scaling = rcfg.routed_scaling_factor

    @abc.abstractmethod
    def score(self, x_TD: torch.Tensor, state: Any, token_ids_T: torch.Tensor | None):
        """(logits_TE, new_state) for the tokens x_TD."""

    def forward(self, x_TD, state=None, token_ids_T=None) -> Routing:
        return self.decide(self.jittered(x_TD), state, token_ids_T)

    def jittered(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The input the router scores: x times Switch's multiplicative noise in training, else x."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        return x_TD

    def decide(self, x_TD, state=None, token_ids_T=None) -> Routing:
        """Scoring and selection without the jitter: no randomness and no host sync, so torch.compile
        traces it whole (model/route_plan.py) and it gives what the eager call gives."""
        # Autocast casts matmul inputs even after .float(): bf16 scores flip choices on near ties, so
        # scoring runs with autocast off (Megatron-Core's fp32 router dtype).
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE, state = self.score(x_TD, state, token_ids_T)
        logits_TE = logits_TE.float()
        probs_TE = torch.sigmoid(logits_TE) if self.score_fn == "sigmoid" else torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE
        if self.use_bias:
            select_TE = probs_TE + self.selection_bias_E
        if self.n_group > 1:
            select_TE = group_limited(select_TE, self.n_group, self.topk_group)
        ids_TK = top_k_stable(select_TE.detach(), self.top_k)
        weights_TK = probs_TE.gather(-1, ids_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.scaling != 1.0:
            weights_TK = weights_TK * self.scaling
        return Routing(ids_TK, weights_TK, logits_TE, probs_TE, state)

    @torch.no_grad()
    def update_selection_bias(self, load_E: torch.Tensor) -> None:
        """DeepSeek-V3's update: raise the bias of under-loaded experts, lower the over-loaded ones."""
        if self.bias_update_rate > 0:
            load_E = load_E.float().to(self.selection_bias_E.device)
            self.selection_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)


class LinearRouter(Router):
    """softmax(x W_r): OpenMoE, Switch, Mixtral."""

    def __init__(self, rcfg, num_experts, top_k, d_model, init_std, frozen=False):
        super().__init__(rcfg, num_experts, top_k)
        w = torch.empty(num_experts, d_model)
        if frozen:  # the frozen random router of RMoE's table: a fixed seed, never trained
            w.normal_(0.0, init_std, generator=torch.Generator().manual_seed(rcfg.seed))
        else:
            nn.init.normal_(w, 0.0, init_std)
        self.weight_ED = nn.Parameter(w, requires_grad=not frozen)

    def score(self, x_TD, state, token_ids_T):
        return x_TD.float() @ self.weight_ED.float().t(), None


class MLPRouter(Router):
    """A two-layer router (RMoE's MLP baseline)."""

    def __init__(self, rcfg, num_experts, top_k, d_model, init_std):
        super().__init__(rcfg, num_experts, top_k)
        self.w1_PD = nn.Parameter(torch.randn(rcfg.hidden, d_model) * init_std)
        self.w2_EP = nn.Parameter(torch.randn(num_experts, rcfg.hidden) * init_std)

    def score(self, x_TD, state, token_ids_T):
        h_TP = F.gelu(x_TD.float() @ self.w1_PD.float().t())
        return h_TP @ self.w2_EP.float().t(), None


class CosineHead(nn.Module):
    """cos(h, e_i) / tau with a learned temperature (X-MoE)."""

    def __init__(self, dim: int, num_experts: int, init_std: float, temperature: float):
        super().__init__()
        self.emb_EP = nn.Parameter(torch.randn(num_experts, dim) * init_std)
        self.log_temp = nn.Parameter(torch.tensor(float(temperature)).log())

    def forward(self, h_TP):
        cos_TE = F.normalize(h_TP.float(), dim=-1) @ F.normalize(self.emb_EP.float(), dim=-1).t()
        # A floor on tau keeps logits bounded, as X-MoE clamps its temperature.
        return cos_TE / self.log_temp.exp().clamp_min(1e-2)


class CosineRouter(Router):
    """X-MoE: project to a low dimension, L2-normalise, cosine against expert embeddings."""

    def __init__(self, rcfg, num_experts, top_k, d_model, init_std):
        super().__init__(rcfg, num_experts, top_k)
        self.proj_PD = nn.Parameter(torch.randn(rcfg.hidden, d_model) * init_std)
        self.head = CosineHead(rcfg.hidden, num_experts, init_std, rcfg.cosine_temperature)

    def score(self, x_TD, state, token_ids_T):
        return self.head(x_TD.float() @ self.proj_PD.float().t()), None


class HashRouter(Router):
    """Experts fixed by token ID (Hash Layers): the null model of context-independent routing."""

    def __init__(self, rcfg, num_experts, top_k, vocab_size):
        super().__init__(rcfg, num_experts, top_k)
        g = torch.Generator().manual_seed(rcfg.seed)
        table_VK = torch.rand(vocab_size, num_experts, generator=g).argsort(dim=-1)[:, :top_k]
        self.register_buffer("table_VK", table_VK.contiguous())

    def score(self, x_TD, state, token_ids_T):
        if token_ids_T is None:
            raise ValueError("the hash router needs the token ids")
        ids_TK = self.table_VK[token_ids_T]
        # Chosen experts get equal logits, the rest a large negative: softmax gives 1/k to each choice.
        logits_TE = torch.full((ids_TK.shape[0], self.num_experts), -1e4, device=x_TD.device)
        # Descending logits by rank keep the table's rank order through the stable sort.
        rank_K = -torch.arange(self.top_k, device=x_TD.device, dtype=torch.float32) * 1e-6
        logits_TE.scatter_(1, ids_TK, rank_K.expand_as(ids_TK).contiguous())
        return logits_TE, None


class RecurrentCore(nn.Module):
    """RMoE's parts shared by every MoE layer: one recurrent cell (and optionally one input projection)."""

    def __init__(self, rcfg: RouterConfig, d_model: int, init_std: float):
        super().__init__()
        p = rcfg.hidden
        self.cell_kind = rcfg.cell
        cells = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}
        self.cell = cells[rcfg.cell](p, p)
        self.proj_PD = nn.Parameter(torch.randn(p, d_model) * init_std) if rcfg.shared_projection else None


class RecurrentRouter(Router):
    """RMoE: x' = W1_i x; h_i = Cell(x', h_{i-1}); logits = head_i(h_i). State carried across layers."""

    def __init__(self, rcfg, num_experts, top_k, d_model, init_std, core: RecurrentCore):
        super().__init__(rcfg, num_experts, top_k)
        p = rcfg.hidden
        # The core is registered once on the decoder; a plain reference here avoids saving it per layer.
        self._core = (core,)
        self.pass_state, self.detach_state = rcfg.pass_state, rcfg.detach_state
        self.proj_PD = None if rcfg.shared_projection else nn.Parameter(torch.randn(p, d_model) * init_std)
        if rcfg.head == "cosine":
            self.head = CosineHead(p, num_experts, init_std, rcfg.cosine_temperature)
        else:
            self.head = nn.Linear(p, num_experts, bias=False)
            nn.init.normal_(self.head.weight, 0.0, init_std)

    @property
    def core(self) -> RecurrentCore:
        return self._core[0]

    def score(self, x_TD, state, token_ids_T):
        core = self.core
        proj_PD = self.proj_PD if self.proj_PD is not None else core.proj_PD
        xp_TP = x_TD.float() @ proj_PD.float().t()
        if not self.pass_state:
            state = None  # the NP ablation: every layer starts from h = 0
        elif state is not None and self.detach_state:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        cell_dtype = core.cell.weight_ih.dtype
        if state is not None:
            state = tuple(s.to(cell_dtype) for s in state) if isinstance(state, tuple) else state.to(cell_dtype)
        new_state = core.cell(xp_TP.to(cell_dtype), state)
        h_TP = new_state[0] if isinstance(new_state, tuple) else new_state
        head = self.head
        if isinstance(head, nn.Linear):  # fp32 even when the parameters are kept in bf16
            return F.linear(h_TP.float(), head.weight.float()), new_state
        return head(h_TP.float()), new_state


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that decide routing: every router's and RMoE's shared recurrent core's, each once."""
    found = {id(p): p for m in model.modules() if isinstance(m, (Router, RecurrentCore)) for p in m.parameters()}
    return list(found.values())


def build_router(cfg: ModelConfig, num_experts: int, core: RecurrentCore | None = None) -> Router:
    r, k, D, std = cfg.moe.router, cfg.moe.top_k, cfg.d_model, cfg.init_std
    if r.kind == "linear":
        return LinearRouter(r, num_experts, k, D, std)
    if r.kind == "random":
        return LinearRouter(r, num_experts, k, D, std, frozen=True)
    if r.kind == "mlp":
        return MLPRouter(r, num_experts, k, D, std)
    if r.kind == "cosine":
        return CosineRouter(r, num_experts, k, D, std)
    if r.kind == "hash":
        return HashRouter(r, num_experts, k, cfg.vocab_size)
    assert core is not None, "the rmoe router needs the decoder's RecurrentCore"
    return RecurrentRouter(r, num_experts, k, D, std, core)
