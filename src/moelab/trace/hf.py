"""Trace any transformers MoE model over a moelab corpus, by observing what each MoE block decided.

Legend: T tokens of a batch, E experts (router classes), K experts per token.

The model runs as transformers built it; `HFRoutingRecorder` (trace/adapters.py) hooks each MoE block's
router and experts module and hands over the expert ids and combine weights the block used, plus the
router's full scores. Nothing is re-derived, so a family's rule (softmax, sigmoid with a correction bias,
group-limited, sparsemixer, ...) cannot be misread, and `output_router_logits` is never needed. Rows go
through the same `write_trace` loop as a moelab trace. The sidecar records the family, its routing rule
and scoring function, and whether the combine weights sum to one, so analyses can label what they measure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from pathlib import Path

import torch

from moelab.config import MoelabError
from moelab.device import resolve_device
from moelab.hf.families import read_hf_config
from moelab.hf.hub import resolve_hf
from moelab.hf.io import safetensors_files
from moelab.hf.model_class import build, model_class
from moelab.trace.adapters import HFRoutingRecorder, scoring_name
from moelab.trace.build import write_trace
from moelab.trace.schema import TraceMeta, check_probs, parse_probs

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str):
    if name not in DTYPES:
        raise MoelabError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def quiet_transformers():
    """Inside, transformers' log (its load report, with the traceback of a failed weight conversion) is kept in
    the yielded list instead of printed, Python warnings and progress bars are off; all restored after. A
    refused load stays moelab's one line."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    root = logging.getLogger("transformers")
    saved, bars = (root.handlers[:], root.level, root.propagate), hf_logging.is_progress_bar_enabled()
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    root.handlers, root.propagate = [Keep(logging.WARNING)], False
    root.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield kept
    finally:
        root.handlers, root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])
        if bars:
            hf_logging.enable_progress_bar()


def _load_error(e: Exception, log: list[str]) -> str:
    """The first line of transformers' error; where that points at its (now unprinted) report, the report's
    own cause: the tensor whose conversion failed and the exception that stopped it."""
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    if "report" not in first:
        return first
    lines = [line.strip() for entry in log for line in entry.splitlines()]
    cause = next((line for line in reversed(lines) if re.match(r"\w+Error: ", line)), None)
    target = next((m.group(1) for line in lines if (m := re.search(r"destined for (\S+?)\.?(?:\s|$)", line))), None)
    if not cause:
        return first
    return f"converting its weights failed{f' at {target}' if target else ''}: {cause}"


def load_hf_model(folder: Path, device: str | torch.device | None = None, *, dtype: str = "auto",
                  device_map: str | None = None):
    """The checkpoint as transformers builds it, as the class `moelab.hf.model_class` picks (its causal LM,
    else the head class it was saved as), eval mode.

    device_map="auto" spreads a model larger than one device over the devices (accelerate decides)."""
    try:
        import transformers
    except ImportError:
        raise MoelabError("tracing a Hugging Face model needs transformers (pip install moelab[hf])") from None
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise MoelabError(f"--device-map {device_map} needs accelerate, which is not installed "
                          "(pip install accelerate)")
    # transformers 4 spells the dtype keyword torch_dtype (and would upcast to fp32 unless asked).
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kw = {key: _dtype(dtype), **({"device_map": device_map} if device_map else {})}
    target = resolve_device(device, "--device") if device_map is None else None  # refused before the load
    safetensors_files(Path(folder))  # weights only from .safetensors: a .bin is a pickle, never opened
    log: list[str] = []
    try:
        with quiet_transformers() as log:
            cls = model_class(folder, transformers.AutoConfig.from_pretrained(str(folder)))
            model, info = cls.from_pretrained(str(folder), output_loading_info=True, use_safetensors=True, **kw)
    except Exception as e:
        raise MoelabError(f"transformers could not load {folder}: {_load_error(e, log)}") from None
    check_loaded(folder, info)
    if device_map is None:
        model = model.to(target)
    return model.eval()


def check_loaded(folder: Path, info: dict) -> None:
    """Refuse a checkpoint that lacks weights the model needs. transformers fills a missing tensor with a
    fresh random initialisation and only logs it, so a folder without, say, one router's weight would be
    traced or ablated with a random router and look like a result."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MoelabError(f"{folder} lacks the weight {missing[0]}{more}, which transformers would initialise at "
                          "random: not a complete checkpoint of this model")


def preflight(folder: Path, model_type: str | None):
    """Refuse before loading a byte of weights: build the model on the meta device and look for its MoE
    blocks and routers (a family the adapter cannot serve, no MoE layers, a router that is not there)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        text = str(e).strip().splitlines()
        raise MoelabError(f"transformers cannot read {folder}/config.json: {text[0] if text else e}") from None
    try:
        with torch.device("meta"):
            model = build(model_class(folder, cfg), cfg)
    except MoelabError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        raise MoelabError(f"transformers cannot build the model of {folder}: {text[0] if text else e}") from None
    HFRoutingRecorder(model, model_type)
    return model  # weightless (meta), for further checks


def input_device(model) -> torch.device:
    """Where token ids go: the embedding's device (the first device under a device map)."""
    return model.get_input_embeddings().weight.device


def config_vocab(raw: dict) -> int:
    """vocab_size of a config.json (a multimodal one keeps it in its text config)."""
    text = raw.get("text_config") or raw.get("thinker_config", {}).get("text_config") or {}
    vocab = raw.get("vocab_size") or text.get("vocab_size")
    if not isinstance(vocab, int):
        raise MoelabError("the model's config.json has no vocab_size (nor a text_config.vocab_size)")
    return vocab


def check_tokenizer(folder: Path, data_dir: Path, corpus, model_vocab: int) -> str:
    """The corpus's token ids must mean the model's tokens: vocab sizes fit, vocabularies equal when the
    model folder ships a tokenizer. Returns the corpus tokenizer's path."""
    from moelab.data.tokenizer import check_vocab_fits, load_tokenizer

    check_vocab_fits(corpus.vocab_size, model_vocab)
    corpus_tok = (data_dir / corpus.info["tokenizer"]["file"]).resolve()  # absolute: readable from anywhere
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        if load_tokenizer(folder).backend.get_vocab() != load_tokenizer(corpus_tok).backend.get_vocab():
            raise MoelabError(f"corpus {data_dir} was tokenized with another tokenizer than {folder}'s: "
                              f"rebuild it with that model's tokenizer (moelab data build --tokenizer {folder})")
    return str(corpus_tok)


@torch.no_grad()
def probe(model, rec: HFRoutingRecorder) -> tuple[list[int], int, bool]:
    """(router classes per MoE layer, K, whether combine weights sum to 1) from a four-token forward: the
    trace's header before any row."""
    model(input_ids=torch.arange(4, device=input_device(model)).view(1, 4), use_cache=False)
    layers = rec.pop()
    sums = torch.cat([c.routing.weights_TK.sum(-1).float().cpu() for c in layers])
    return ([c.routing.probs_TE.shape[-1] for c in layers], layers[0].routing.expert_ids_TK.shape[-1],
            bool(((sums - 1).abs() < 1e-2).all()))


def routing_meta(rec: HFRoutingRecorder, widths: list[int], top_k: int, sums_to_one: bool, raw: dict,
                 source: str, tokenizer: str, corpus) -> TraceMeta:
    e = rec.entry
    return TraceMeta(num_experts=widths, top_k=top_k, model_config=raw, source=source, tokenizer=tokenizer,
                     labels={"domain": list(corpus.domains), "lang": list(corpus.langs)},
                     extra={"moe_blocks": [b.block for b in rec.blocks], "family": rec.family,
                            "routing_rule": e.rule,
                            "scoring_function": scoring_name(e, rec.blocks[0].router),
                            "rank": "descending combine weight",
                            "weights_sum_to_one": sums_to_one, "capture": "hooks on router and experts"})


@torch.no_grad()
def trace_hf(name_or_path: str | Path, data_dir: str | Path, out_path: str | Path, *, tokens: int,
             split: str = "heldout", seq_len: int = 256, batch_size: int = 8, full_probs: bool = True,
             device: str | torch.device | None = None, dtype: str = "auto", device_map: str | None = None,
             progress: bool = True, revision: str | None = None, probs: str | None = None,
             balanced: bool = False) -> dict[str, int]:
    """Stream a transformers MoE model's routing of `tokens` corpus tokens into a trace (docs/TRACE.md).

    `probs`: "full", "top:N" or "none" (`full_probs` is the older switch between full and none).
    `balanced`: `tokens` shared among the split's domains (`iter_sequential`'s balanced_tokens), not its
    first tokens in corpus order."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.train.log import Progress

    mode = parse_probs(probs or ("full" if full_probs else "none"))
    folder = resolve_hf(name_or_path, revision)
    raw = read_hf_config(folder)
    data_dir = Path(data_dir)
    corpus = load_corpus(data_dir)
    tokenizer = check_tokenizer(folder, data_dir, corpus, config_vocab(raw))  # before a long load
    preflight(folder, raw.get("model_type"))
    model = load_hf_model(folder, device, dtype=dtype, device_map=device_map)
    with HFRoutingRecorder(model, raw.get("model_type")) as rec:
        widths, top_k, sums_to_one = probe(model, rec)
        check_probs(mode, widths, top_k)  # N against the model's E and k, before a row is written
        meta = routing_meta(rec, widths, top_k, sums_to_one, raw, f"hf:{name_or_path}", tokenizer, corpus)
        if revision is not None:  # which checkpoint of the repo: the early-routing report labels it so
            meta.extra["revision"] = revision
        batches = iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split=split,
                                  balanced_tokens=tokens if balanced else None)
        bar = Progress(tokens, "trace") if progress else None
        where = input_device(model)

        def capture(batch):
            # Padding only ever ends a row, so under the causal mask no real token sees it: no attention mask.
            model(input_ids=batch["input_ids"].to(where), use_cache=False)
            return rec.pop()

        try:
            return write_trace(batches, out_path, meta, capture, optional=[], blocks=meta.extra["moe_blocks"],
                               max_tokens=tokens, probs=mode, progress=bar)
        finally:
            if bar:
                bar.close()
