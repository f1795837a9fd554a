"""Capture a transformers MoE model's routing by observation: one adapter, a table of families.

Legend: T tokens, D model dim, E experts (router classes), K experts per token.

transformers (5.x) builds nearly every MoE block the same way: a router module (`gate` or `router`) returns
`(logits, weights, ids)` and the block hands `(x, ids, weights)` to an `...Experts` module. So the adapter
reads the decision where the block hands it over, with a forward pre-hook on the experts module (the ids
and weights it combines with, whatever rule chose them), and the full pre-selection scores with a forward
hook on the router (its first output). Nothing is re-derived, and nothing depends on
`output_router_logits`. A family needs a table entry only to name its scoring function and routing rule
(for the trace's metadata and the probabilities column), or to say where its decision lives when it is
not in the experts' arguments. A family the adapter cannot serve has an entry saying why, in one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import torch

from moelab.config import MoelabError
from moelab.model.moe import LayerRouting
from moelab.trace.capture import CapturedLayer

# Modules under these path parts belong to a vision/audio tower or a speech talker, not the text decoder.
_NOT_TEXT = re.compile(r"(^|\.)(visual|vision\w*|audio\w*|talker|code2wav|\w*encoder)(\.|$)")
_ROUTER_NAMES = ("gate", "router")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers family routes; every field but `score`/`rule` is the exception, not the rule.

    score: what the probabilities column holds, computed from the router's first output:
      "softmax" / "sigmoid" of the logits, "given" (the router returns probabilities, not logits),
      or "attr:<name>" (the router module's own scoring function, chosen by its config).
    rule: the routing rule in words, written to the trace's metadata so analyses can label their nulls.
    sums_to_one: whether a token's combine weights sum to 1 (False: sigmoid gates, routed scaling; None:
      when the config renormalises over the k). A trace records what it measured, not this.
    decision: "experts_args" (ids, weights are the experts module's 2nd and 3rd arguments),
      "router_scores" (the router returns a dense [T, E] score with zeros off the choice, Llama 4) or
      "router_output" (the router's own (logits, weights, ids): the block rewrites some choices before
      the experts see them, LongCat-Flash's zero experts become a real id with weight 0).
    weight_on_input: the weight scales the expert's input, not its output (Llama 4).
    skip_zero: a weight of exactly 0 marks the router's skip class (Zaya): the row is marked dropped.
    refuse: why the adapter cannot serve the family (one line), or None.
    """

    score: str
    rule: str
    sums_to_one: bool | None = True
    decision: str = "experts_args"
    weight_on_input: bool = False
    skip_zero: bool = False
    refuse: str | None = None


SOFTMAX_TOPK = "softmax over all experts, top-k"
DSV3 = ("DeepSeek-V3: sigmoid scores, top-k of scores + selection-only correction bias within the "
        "top n_group/topk_group groups, weights = scores (optionally renormalised) x routed_scaling_factor")
SIGMOID_BIAS = "sigmoid scores, top-k of scores + selection-only correction bias, weights renormalised"
DSV2 = "DeepSeek-V2: softmax scores, group-limited top-k, weights x routed_scaling_factor"
TOPK_SOFTMAX = "top-k of the logits, softmax over the k chosen logits only"


def _f(score, rule, **kw) -> Family:
    return Family(score, rule, **kw)


_SOFTMAX = _f("softmax", SOFTMAX_TOPK + " (renormalised over the k when the config says so)", sums_to_one=None)
_DSV3 = _f("sigmoid", DSV3, sums_to_one=False)  # unless renormalised with routed_scaling_factor = 1
_SIGB = _f("sigmoid", SIGMOID_BIAS)
_KOLIBRI = _f("sigmoid", SIGMOID_BIAS + " when the config says so", sums_to_one=False)

FAMILIES: dict[str, Family] = {
    "afmoe": _f("sigmoid", "sigmoid scores, top-k of scores + expert bias, renormalised x route_scale",
                sums_to_one=False),
    "aria": _SOFTMAX, "axk1": _DSV3, "axk2": _DSV3, "bailing_hybrid": _DSV3, "beam": _DSV3,
    "cohere2_moe": _f("attr:expert_selection_fn", "top-k of the logits, then softmax or sigmoid of the k "
                      "chosen logits (expert_selection_fn)", sums_to_one=False),
    "dbrx": _SOFTMAX,
    "deepseek_ocr2": _f("softmax", DSV2, sums_to_one=False),
    "deepseek_v2": _f("softmax", DSV2, sums_to_one=False),
    "deepseek_v3": _DSV3, "deepseek_v32": _DSV3,
    "deepseek_v4": _f("attr:score_fn", "DeepSeek-V4: hash-routed first layers (experts fixed by token id), "
                      "then score_fn scores, top-k of scores + correction bias, renormalised x "
                      "routed_scaling_factor", sums_to_one=False),
    "diffusion_gemma": _f("given", "softmax over all experts (returned in place of logits), top-k, "
                          "renormalised, x per-expert scale", sums_to_one=False),
    "doge": _f("none", "product-key routing", refuse="product-key routing over embedding experts "
               "(DogeCDMoE) hands no per-token expert ids and weights to an experts module"),
    "dots1": _DSV3, "dots3_note": _DSV3,
    "ergo": _f("sigmoid", SIGMOID_BIAS + " x routed_scaling_factor", sums_to_one=False),
    "ernie4_5_moe": _f("softmax", SOFTMAX_TOPK + ", with a selection-only correction bias, renormalised"),
    "ernie4_5_vl_moe": _f("softmax", SOFTMAX_TOPK + ", with a selection-only correction bias, renormalised"),
    "exaone_moe": _DSV3, "flex_olmo": _SOFTMAX,
    "flint": _f("sigmoid", "sigmoid scores, top-k (renormalised when the config says so)", sums_to_one=None),
    "gemma4": _f("given", "softmax over all experts (returned in place of logits), top-k, renormalised, "
                 "x per-expert scale", sums_to_one=False),
    "glm4_moe": _DSV3, "glm4_moe_lite": _DSV3, "glm4v_moe": _DSV3, "glm5_next": _DSV3, "glm_moe_dsa": _DSV3,
    "gpt_oss": _f("softmax", TOPK_SOFTMAX + " (router has a bias)"),
    "granitemoe": _f("softmax", TOPK_SOFTMAX), "granitemoe_swa": _f("softmax", TOPK_SOFTMAX),
    "granitemoehybrid": _f("softmax", TOPK_SOFTMAX), "granitemoeshared": _f("softmax", TOPK_SOFTMAX),
    "hunyuan_v1_moe": _SOFTMAX,
    "hy_v3": _f("sigmoid", SIGMOID_BIAS + " x routed_scaling_factor", sums_to_one=False),
    "hy_v4": _DSV3, "hy_v4_vl": _DSV3,
    "inkling": _f("sigmoid", SIGMOID_BIAS, sums_to_one=False),
    "inkling2": _f("attr:score_fn", "score_fn scores, top-k of scores + correction bias, renormalised x "
                   "routed_scaling_factor", sums_to_one=False),
    "inkling2_loop": _f("attr:score_fn", "score_fn scores, top-k of scores + correction bias, renormalised x "
                        "routed_scaling_factor", sums_to_one=False),
    "jamba": _SOFTMAX,
    "jetmoe": _f("softmax", TOPK_SOFTMAX, refuse="two routers per block (attention and FFN experts) that "
                 "hand over a sorted dispatch (batch_index, batch_gates, expert_size), not per-token ids"),
    "kimi_linear": _DSV3,
    "kolibri1": _KOLIBRI, "kolibri1_1": _KOLIBRI,  # 1.1 changed attention only: the same router class
    "laguna": _f("sigmoid", "optionally soft-capped logits, " + SIGMOID_BIAS),
    "lara_mini": _SOFTMAX,
    "lfm2_moe": _f("sigmoid", "sigmoid scores, top-k of scores + expert bias, renormalised x "
                   "routed_scaling_factor", sums_to_one=False),
    "llama4": _f("sigmoid", "top-k of the logits, sigmoid of each chosen logit scales the expert's input",
                 sums_to_one=False, decision="router_scores", weight_on_input=True),
    "longcat_flash": _f("softmax", "softmax over routed + zero-computation experts (+ bias), top-k, "
                        "x routed_scaling_factor; ids >= n_routed_experts are zero experts",
                        sums_to_one=False, decision="router_output"),
    "mellum": _SOFTMAX,
    "mimo_v2_flash": _DSV3,
    "minimax": _SOFTMAX,
    "minicpm5_moe": _DSV3,
    "minimax_m2": _SIGB, "minimax_m3_vl": _SIGB,
    "mistral4": _f("softmax", DSV2 + " (renormalised when the config says so)", sums_to_one=False),
    "mistral_large4": _f("softmax", DSV2, sums_to_one=False),
    "mixtral": _f("softmax", SOFTMAX_TOPK + ", renormalised over the k"),
    "muse_spark": _f("attr:scoring_function", "scoring_function scores, top-k of scores + correction bias, "
                     "renormalised x routed_scaling_factor", sums_to_one=False),
    "nemotron_h": _DSV3,
    "olmoe": _SOFTMAX,
    "openai_privacy_filter": _f("softmax", TOPK_SOFTMAX + " (router has a bias)"),
    "phimoe": _f("softmax", "sparsemixer: masked softmax per rank with jitter thresholds (probs column: "
                 "softmax over all logits)", sums_to_one=False),
    "qwen2_moe": _SOFTMAX, "qwen3_5_moe": _SOFTMAX, "qwen3_moe": _SOFTMAX, "qwen3_next": _SOFTMAX,
    "qwen3_omni_moe": _SOFTMAX, "qwen3_vl_moe": _SOFTMAX, "qwen4_exp": _SOFTMAX,
    "solar_open": _DSV3,
    "step3p7": _SIGB,
    "unlimited_ocr": _f("softmax", DSV2, sums_to_one=False),
    "zaya": _f("softmax", "MLP router with state passed between layers, softmax over experts + a skip "
               "class, top-k of probs + balancing bias; skip choices are marked dropped",
               sums_to_one=False, skip_zero=True),
}
# The transformers release the family table was last checked on (tests/trace/test_hf_coverage.py, every
# family traced and its routing verified); an older release may implement a family's routing differently.
CHECKED_TRANSFORMERS = "5.25"


def transformers_older_than_checked() -> bool:
    """Whether the installed transformers predates CHECKED_TRANSFORMERS (major.minor)."""
    import transformers

    def minor(version: str) -> tuple[int, ...]:
        return tuple(int(v) for v in version.split(".")[:2])

    return minor(transformers.__version__) < minor(CHECKED_TRANSFORMERS)

# Used for a family transformers adds later: the decision is still read from the experts' arguments.
UNLISTED = Family("softmax", "not in moelab's family table: the probs column is softmax(logits)",
                  sums_to_one=False)


def family_entry(model_type: str) -> Family:
    """The table entry of a model_type (a multimodal model's text type maps to its family)."""
    # "_text" before "_moe_text": qwen3_vl_moe_text is qwen3_vl_moe's text model, not a family "qwen3_vl".
    for key in (model_type, re.sub(r"_(text|thinker)$", "", model_type), re.sub(r"_moe_text$", "", model_type)):
        if key in FAMILIES:
            return FAMILIES[key]
    return UNLISTED


# ---- finding the MoE blocks ---------------------------------------------------------------------------
@dataclasses.dataclass
class MoEBlock:
    block: int  # decoder layer index
    name: str  # module path, e.g. model.layers.3.mlp
    module: torch.nn.Module
    experts: torch.nn.Module
    router: torch.nn.Module | None


def _layer_index(name: str) -> int | None:
    found = re.findall(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)(?:\.|$)", name)
    return int(found[-1]) if found else None


def find_moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """Every text-decoder module that owns an `...Experts` child, with its router, in layer order."""
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module) or _NOT_TEXT.search(name):
            continue
        layer = _layer_index(name)
        if layer is None:
            continue
        router = next((getattr(module, r) for r in _ROUTER_NAMES
                       if isinstance(getattr(module, r, None), torch.nn.Module)), None)
        blocks.append(MoEBlock(layer, name, module, experts, router))
    if len({b.block for b in blocks}) != len(blocks):
        raise MoelabError("more than one MoE block per decoder layer: the adapter traces one per layer")
    return sorted(blocks, key=lambda b: b.block)


def router_of(model: torch.nn.Module, block: MoEBlock) -> torch.nn.Module | None:
    """The block's router: its own child, else one beside it in its decoder layer (Zaya keeps it there)."""
    if block.router is not None:
        return block.router
    layer = model.get_submodule(block.name.rsplit(".", 1)[0])
    return next((getattr(layer, r) for r in _ROUTER_NAMES if isinstance(getattr(layer, r, None), torch.nn.Module)),
                None)


# ---- reading the decision -----------------------------------------------------------------------------
def _experts_args(module, args, kwargs):
    """(x_TD, ids_TK, weights_TK) from the experts module's call, positional or by keyword."""
    if len(args) >= 3:
        return args[0], args[1], args[2]
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    if len(values) < 3:
        raise MoelabError(f"{type(module).__name__} is called without expert ids and weights")
    return values[0], values[1], values[2]


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def scores_from(entry: Family, router: torch.nn.Module | None, first_TE: torch.Tensor) -> torch.Tensor:
    """The probabilities column from the router's first output, by the family's scoring function."""
    x = first_TE.detach().float()
    kind = entry.score
    if kind.startswith("attr:"):
        fn = getattr(router, kind[5:], None)
        if callable(fn):
            return fn(x).float()
        kind = str(fn)  # a config string such as "softmax" or "sigmoid"
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "given":
        return x
    return torch.softmax(x, dim=-1)


def scoring_name(entry: Family, router: torch.nn.Module | None) -> str:
    """The scoring function in words for the trace's metadata (a config-chosen one resolved)."""
    if not entry.score.startswith("attr:"):
        return entry.score
    fn = getattr(router, entry.score[5:], None)
    return getattr(fn, "__name__", type(fn).__name__) if callable(fn) else str(fn)


# ---- the recorder -------------------------------------------------------------------------------------
def text_model_type(model: torch.nn.Module) -> str:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "model_type", None) or getattr(text, "model_type", "")


class HFRoutingRecorder:
    """`with HFRoutingRecorder(model) as rec: model(ids)`; then `rec.pop()` gives one CapturedLayer per MoE
    block, in layer order, for the last forward. Hooks are removed on exit, even after an error."""

    def __init__(self, model: torch.nn.Module, model_type: str | None = None):
        self.family = model_type or text_model_type(model)
        self.entry = family_entry(self.family)
        if self.entry.refuse:
            raise MoelabError(f"cannot trace {self.family!r}: {self.entry.refuse}")
        self.blocks = find_moe_blocks(model)
        if not self.blocks:
            raise MoelabError(f"{self.family!r} model has no MoE layers to trace (no module holds experts)")
        for b in self.blocks:
            b.router = router_of(model, b)
            if b.router is None:
                raise MoelabError(f"cannot find the router of MoE block {b.name} (no 'gate' or 'router' module)")
        self._handles: list = []
        self._seen: dict[int, dict[str, torch.Tensor]] = {}

    def _on_experts(self, block: int):
        def hook(module, args, kwargs):
            try:
                _, ids, weights = _experts_args(module, args, kwargs)
                ids, weights = ids.detach(), weights.detach()
            except (TypeError, ValueError, IndexError, AttributeError, MoelabError) as e:
                raise self._unreadable(module, "call", e) from None
            seen = self._seen.setdefault(block, {})
            seen["calls"] = seen.get("calls", 0) + 1
            seen.update(ids=ids, weights=weights)
        return hook

    def _on_router(self, block: int):
        def hook(module, args, out):
            seen = self._seen.setdefault(block, {})
            try:
                if self.entry.decision == "router_scores":  # Llama 4: (dense scores_TE, logits_TE)
                    seen["dense"], seen["first"] = out[0].detach(), out[1].detach()
                elif self.entry.decision == "router_output":  # (logits, weights, ids), before the block edits them
                    seen["first"], seen["weights"], seen["ids"] = (t.detach() for t in out[:3])
                    seen["calls"] = seen.get("calls", 0) + 1
                else:
                    seen["first"] = _first_tensor(out).detach()
            except (TypeError, ValueError, IndexError, AttributeError) as e:
                raise self._unreadable(module, "output", e) from None
        return hook

    def _unreadable(self, module: torch.nn.Module, what: str, why: object) -> MoelabError:
        """One line: this family's module does not have the form moelab's table reads, as happens when the
        installed transformers implements the family differently from the version the table was checked on."""
        import transformers

        return MoelabError(f"cannot trace {self.family!r} with transformers {transformers.__version__}: "
                           f"{type(module).__name__}'s {what} is not in the form moelab reads ({why}); its "
                           f"family table was checked on transformers {CHECKED_TRANSFORMERS}")

    def __enter__(self) -> "HFRoutingRecorder":
        try:
            for b in self.blocks:
                self._handles.append(b.router.register_forward_hook(self._on_router(b.block)))
                if self.entry.decision == "experts_args":
                    self._handles.append(b.experts.register_forward_pre_hook(self._on_experts(b.block),
                                                                             with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop(self) -> list[CapturedLayer]:
        built = [self._layer(b) for b in self.blocks]
        self._seen = {}
        self._check_ids(built)
        return [layer for layer, _ in built]

    def _check_ids(self, built: list[tuple[CapturedLayer, torch.Tensor | None]]) -> None:
        """Every block's expert ids lie inside its scores, read back in one device sync for all blocks (one
        per block, two reads each, stalled the GPU 2 L times a batch). Checked before any row is built: on
        CUDA an id past the scores would end the process in a device-side assert at the first gather."""
        ranged = [(b, layer, lohi) for b, (layer, lohi) in zip(self.blocks, built) if lohi is not None]
        if not ranged:
            return
        where = ranged[0][2].device  # blocks placed on several devices (device_map) meet on the first's
        values = torch.stack([lohi.to(where) for *_, lohi in ranged]).tolist()
        for (b, layer, _), (lo, hi) in zip(ranged, values):
            width = layer.routing.probs_TE.shape[-1]
            if lo < 0 or hi >= width:
                raise self._id_problem(b, layer.routing.expert_ids_TK.shape[0], lo, hi, layer.routing.probs_TE)

    def _id_problem(self, b: MoEBlock, tokens: int, lo: int, hi: int, probs_TE: torch.Tensor) -> MoelabError:
        # a router output read in the wrong form: refused, never written as a trace
        return self._unreadable(b.router, "output", f"{tokens} tokens' expert ids in [{lo}, {hi}] "
                                f"against scores of shape {tuple(probs_TE.shape)}")

    def _layer(self, b: MoEBlock) -> tuple[CapturedLayer, torch.Tensor | None]:
        """The block's routing, and its ids' [min, max] on the device (None when no token routed)."""
        seen = self._seen.get(b.block, {})
        if "first" not in seen or ("ids" not in seen and "dense" not in seen):
            raise MoelabError(f"MoE block {b.name} did not route in this forward (router or experts not called)")
        if seen.get("calls", 1) > 1:  # a looped model: one row per (token, layer) cannot hold both choices
            raise MoelabError(f"MoE block {b.name} ran {seen['calls']} times in one forward: the trace holds "
                              "one choice per token and layer")
        first = seen["first"]
        probs_TE = scores_from(self.entry, b.router, first.reshape(-1, first.shape[-1]))
        logits_TE = first.reshape(-1, first.shape[-1]).float()
        if self.entry.decision == "router_scores":
            dense_TE = seen["dense"].reshape(-1, first.shape[-1]).float()
            K = int(getattr(b.router, "top_k", 1))
            weights_TK, ids_TK = torch.topk(dense_TE, K, dim=-1)
        else:
            K = seen["ids"].shape[-1]
            ids_TK, weights_TK = seen["ids"].reshape(-1, K).long(), seen["weights"].reshape(-1, K).float()
        lohi_2 = torch.stack([ids_TK.min(), ids_TK.max()]) if ids_TK.numel() else None
        if ids_TK.shape[0] != probs_TE.shape[0]:
            lo, hi = lohi_2.tolist() if lohi_2 is not None else (0, -1)
            raise self._id_problem(b, ids_TK.shape[0], lo, hi, probs_TE)
        # Rank 0 = the largest combine weight: several families take an unsorted top-k (sorted=False).
        order_TK = weights_TK.argsort(dim=-1, descending=True, stable=True)
        ids_TK, weights_TK = ids_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)
        dropped_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
        if self.entry.skip_zero:  # Zaya: the skip class is the router's last class
            dropped_TK = weights_TK == 0
            ids_TK = torch.where(dropped_TK, torch.full_like(ids_TK, probs_TE.shape[-1] - 1), ids_TK)
        return CapturedLayer(LayerRouting(b.block, ids_TK, weights_TK, probs_TE, dropped_TK, logits_TE)), lohi_2
