"""A Closer Look's all-experts pass on a transformers MoE model: every routed expert run on every token.

Legend: T tokens, D model dim, E experts, P = E(E-1)/2 expert pairs.

moelab's own pass (trace/capture.py) reads a moelab model's stacked weights. A transformers model keeps
its experts in one `...Experts` module called as `experts(x_TD, ids_TK, weights_TK)`; called with every
token sent to expert e at weight 1, it returns expert e's unweighted output, computed by the model's own
code, whatever the family's activation or weight layout. The input is the one the block handed its experts
in the normal pass (read by a pre-hook), so the norms are of the outputs the router chose between.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.config import MoelabError
from moelab.trace.adapters import HFRoutingRecorder, _experts_args


def norms_refusal(model_type: str) -> str | None:
    """Why the family's experts cannot be run one at a time this way (None: they can)."""
    from moelab.trace.adapters import family_entry

    e = family_entry(model_type)
    if e.refuse:
        return e.refuse
    if e.decision != "experts_args":
        return f"{model_type}'s block decides outside its experts module's arguments ({e.decision})"
    if e.weight_on_input:
        return f"{model_type} scales the expert's input by its weight, so weight 1 is not its plain output"
    return None


class ExpertInputs:
    """`with ExpertInputs(blocks) as xs: model(ids)`; then xs[block] is the x_TD the block's experts got."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.x: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> dict[int, torch.Tensor]:
        def keep(block: int):
            def hook(module, args, kwargs):
                self.x[block] = _experts_args(module, args, kwargs)[0].detach()
            return hook

        self._handles = [b.experts.register_forward_pre_hook(keep(b.block), with_kwargs=True) for b in self.blocks]
        return self.x

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def expert_outputs(experts: torch.nn.Module, x_TD: torch.Tensor, E: int,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms_TE, cos_TP): each expert's unweighted output norm, and the pairwise cosines of the outputs.
    Tokens go `chunk` at a time: the outputs of all E experts ([chunk, E, D]) are held at once."""
    x_TD = x_TD.reshape(-1, x_TD.shape[-1])
    iu, ju = torch.triu_indices(E, E, offset=1, device=x_TD.device)
    norms, coss = [], []
    for x in x_TD.split(chunk):
        T = x.shape[0]
        ones_T1 = torch.ones(T, 1, dtype=x.dtype, device=x.device)
        y_TED = torch.stack([experts(x, torch.full((T, 1), e, dtype=torch.long, device=x.device), ones_T1)
                             for e in range(E)], dim=1).float()
        unit = F.normalize(y_TED, dim=-1)
        norms.append(y_TED.norm(dim=-1))
        coss.append((unit[:, iu] * unit[:, ju]).sum(-1))
    return torch.cat(norms), torch.cat(coss)


@torch.no_grad()
def trace_hf_all_experts(folder: Path, corpus_dir: Path, out: Path, *, tokens: int, seq_len: int,
                         batch_size: int) -> None:
    """A trace of the model's routing with the expert_norms and expert_cos columns (no expert_density: the
    share of active units needs the expert's internals, which this pass does not open)."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.hf.families import read_hf_config
    from moelab.trace.build import write_trace
    from moelab.trace.hf import config_vocab, input_device, load_hf_model, probe, routing_meta

    raw = read_hf_config(folder)
    corpus = load_corpus(corpus_dir)
    model = load_hf_model(folder)
    why = norms_refusal(raw.get("model_type") or "")
    if why:
        raise MoelabError(f"the all-experts pass cannot run on this model: {why}")
    with HFRoutingRecorder(model, raw.get("model_type")) as rec:
        widths, top_k, sums_to_one = probe(model, rec)
    if config_vocab(raw) < corpus.vocab_size:
        raise MoelabError(f"the corpus's vocabulary ({corpus.vocab_size}) exceeds the model's ({config_vocab(raw)})")
    meta = routing_meta(rec, widths, top_k, sums_to_one, raw, f"hf:{folder}",
                        str(corpus_dir / corpus.info["tokenizer"]["file"]), corpus)
    meta.extra["all_experts"] = "each routed expert called alone at weight 1 on the block's expert input"
    where = input_device(model)

    def capture(batch):
        with HFRoutingRecorder(model, raw.get("model_type")) as r, ExpertInputs(r.blocks) as xs:
            model(input_ids=batch["input_ids"].to(where), use_cache=False)
            layers = r.pop()
        for cap, b, E in zip(layers, r.blocks, widths):  # hooks removed: these calls record nothing
            cap.expert_norms_TE, cap.expert_cos_TP = expert_outputs(b.experts, xs[b.block], E)
            cap.expert_density_TE = torch.zeros_like(cap.expert_norms_TE)  # not a column of this trace
        return layers

    batches = iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split="heldout", balanced_tokens=tokens)
    write_trace(batches, out, meta, capture, optional=["probs", "expert_norms", "expert_cos"],
                blocks=meta.extra["moe_blocks"], max_tokens=tokens, full_probs=True)
