"""Trace a transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) over a moelab corpus.

Legend: T tokens of a batch, E experts, K experts per token.

The model runs as transformers built it, with `output_router_logits=True`; each MoE layer's choices are
recomputed from its router logits with the family's own rule (softmax, `torch.topk`, then renormalised
over the k when the family does: always for Mixtral, `norm_topk_prob` for the others), which is what the
model's own router computes. Rows go through the same `batch_rows` and `TraceWriter` as a moelab trace,
with nothing dropped (these models are dropless).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moelab.config import MoelabError
from moelab.hf.families import HFFields, family_of, read_hf_config
from moelab.hf.hub import resolve_hf
from moelab.model.moe import LayerRouting
from moelab.trace.build import write_trace
from moelab.trace.capture import CapturedLayer
from moelab.trace.schema import TraceMeta


def hf_routing_rule(raw: dict[str, Any]) -> dict[str, Any]:
    """family, num_experts, top_k, renormalize and the MoE blocks of a transformers config.json."""
    family = family_of(raw)
    f = HFFields(raw, family)
    qwen = family in ("qwen2_moe", "qwen3_moe")
    step = f["decoder_sparse_step"] if qwen else 1
    dense = set(f["mlp_only_layers"]) if qwen else set()
    blocks = [i for i in range(f["num_hidden_layers"]) if (i + 1) % step == 0 and i not in dense]
    if not f.num_experts or not blocks:
        raise MoelabError(f"{family} model has no MoE layers to trace")
    return {"family": family, "num_experts": f.num_experts, "top_k": f["num_experts_per_tok"],
            "renormalize": family == "mixtral" or bool(f["norm_topk_prob"]), "blocks": blocks,
            "vocab_size": f["vocab_size"]}


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, ...]:
    """(expert_ids_TK, weights_TK, probs_TE): the transformers routers' selection, in fp32."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK, probs_TE


def captured_layers(router_logits, rule: dict[str, Any]) -> list[CapturedLayer]:
    """One CapturedLayer per MoE layer, as moelab's RoutingRecorder would have recorded it."""
    if len(router_logits) != len(rule["blocks"]):
        raise MoelabError(f"the model returned router logits for {len(router_logits)} layers, "
                          f"its config has {len(rule['blocks'])} MoE layers")
    out = []
    for block, logits in zip(rule["blocks"], router_logits):
        logits_TE = logits.detach().float().cpu()
        ids, weights, probs = route(logits_TE, rule["top_k"], rule["renormalize"])
        out.append(CapturedLayer(LayerRouting(block, ids, weights, probs, torch.zeros_like(ids, dtype=torch.bool),
                                              logits_TE)))
    return out


def load_hf_model(folder: Path, device: str | torch.device):
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MoelabError("tracing a Hugging Face model needs transformers (pip install moelab[hf])") from None
    # The checkpoint's own dtype (transformers 4 would upcast to fp32 unless asked); keyword renamed in 5.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **{key: "auto"})
    except Exception as e:
        text = str(e).strip().splitlines()
        raise MoelabError(f"transformers could not load {folder}: {text[0] if text else type(e).__name__}") from None
    return model.to(device).eval()


def check_tokenizer(folder: Path, data_dir: Path, corpus, model_vocab: int) -> str:
    """The corpus's token ids must mean the model's tokens: vocab sizes fit, vocabularies equal when the
    model folder ships a tokenizer. Returns the corpus tokenizer's path."""
    from moelab.data.tokenizer import check_vocab_fits, load_tokenizer

    check_vocab_fits(corpus.vocab_size, model_vocab)
    corpus_tok = data_dir / corpus.info["tokenizer"]["file"]
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        if load_tokenizer(folder).backend.get_vocab() != load_tokenizer(corpus_tok).backend.get_vocab():
            raise MoelabError(f"corpus {data_dir} was tokenized with another tokenizer than {folder}'s: "
                              f"rebuild it with that model's tokenizer (moelab data build --tokenizer {folder})")
    return str(corpus_tok)


@torch.no_grad()
def trace_hf(name_or_path: str | Path, data_dir: str | Path, out_path: str | Path, *, tokens: int,
             split: str = "heldout", seq_len: int = 256, batch_size: int = 8, full_probs: bool = True,
             device: str | torch.device | None = None, progress: bool = True) -> dict[str, int]:
    """Stream a transformers MoE model's routing of `tokens` corpus tokens into a trace (docs/TRACE.md)."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.train.log import Progress

    folder = resolve_hf(name_or_path)
    raw = read_hf_config(folder)
    rule = hf_routing_rule(raw)
    data_dir = Path(data_dir)
    corpus = load_corpus(data_dir)
    tokenizer = check_tokenizer(folder, data_dir, corpus, rule["vocab_size"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_hf_model(folder, device)
    meta = TraceMeta(num_experts=[rule["num_experts"]] * len(rule["blocks"]), top_k=rule["top_k"],
                     model_config=raw, source=f"hf:{name_or_path}", tokenizer=tokenizer,
                     labels={"domain": list(corpus.domains), "lang": list(corpus.langs)},
                     extra={"moe_blocks": rule["blocks"], "family": rule["family"],
                            "renormalize": rule["renormalize"]})
    batches = iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split=split)
    bar = Progress(tokens, "trace") if progress else None
    try:
        return _write(model, batches, out_path, meta, rule, tokens, full_probs, device, bar)
    finally:
        if bar:
            bar.close()


def _write(model, batches, out_path, meta, rule, max_tokens, full_probs, device, bar) -> dict[str, int]:
    def capture(batch):
        # Padding only ever ends a row, so under the causal mask no real token sees it: no attention mask.
        out = model(input_ids=batch["input_ids"].to(device), output_router_logits=True, use_cache=False)
        return captured_layers(out.router_logits, rule)

    return write_trace(batches, out_path, meta, capture, optional=["probs"] if full_probs else [],
                       blocks=rule["blocks"], max_tokens=max_tokens, full_probs=full_probs, progress=bar)
