"""The training loop: batches -> loss + aux loss -> optimiser step, with logging, evaluation, checkpoints.

A run directory holds `config.json` (the resolved run config), `metrics.jsonl`, `tensorboard/`, `eval.json`
and `checkpoints/step_NNNNNN/`. Batches are a pure function of (seed, step), and the RNG and optimiser
state travel with each checkpoint, so `--resume` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab.config import MoelabError
from moelab.data.objectives import iter_sequential
from moelab.data.shards import load_corpus
from moelab.data.tokenizer import check_vocab_fits
from moelab.device import resolve_device
from moelab.distributed.mesh import rank_device
from moelab.distributed.trainer import ParallelRun
from moelab.model.routers import routing_parameters
from moelab.model.transformer import MoETransformer, build_model
from moelab.model.upcycle import expert_cosine
from moelab.train.checkpoint import (
    assign_weights, check_architecture, check_resumable, check_same_tokenizer, checkpoint_step, read_checkpoint_config,
)
from moelab.train.checkpoint import resume as resume_checkpoint
from moelab.train.config import RunConfig
from moelab.train.log import Progress, RunLogger
from moelab.train.metrics import routing_metrics
from moelab.train.optim import build_optimizer, lr_at, set_lr
from moelab.train.phases import build_train_sampler
from moelab.train.precision import maybe_master_weights
from moelab.train.replay import ReplaySampler, replay_routing
from moelab.train.rundir import check_run_dir, clear_run_dir, lock_run_dir, remove_leftovers
from moelab.train.step_options import apply_step_options
from moelab.train.upcycle import available_memory, step0_change


@dataclass
class TrainResult:
    out_dir: Path
    final_checkpoint: Path
    checkpoints: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    tokens_per_second: float = 0.0


def train_bytes(run: RunConfig) -> int:
    """A floor on one process's training memory: fp32 weights and gradients, plus AdamW's two moments
    (adafactor's factored state counted as nothing), the model split evenly over the dp x ep ranks.
    Activations and the data come on top."""
    per_param = 16 if run.train.optimizer == "adamw" else 8
    return per_param * run.model.num_params() // (run.parallel.dp * run.parallel.ep)


def check_train_fits(run: RunConfig, device: torch.device, available: int | None = None) -> None:
    """Refuse in one line, before a weight is allocated, a model that cannot fit (upcycle's check, for train)."""
    if available is None:
        try:
            available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                         else available_memory() if device.type == "cpu" else None)
        except RuntimeError:
            available = None
    need = train_bytes(run)
    if available is not None and need > available:
        raise MoelabError(f"training {run.model.num_params():,} parameters needs at least {need / 2**30:,.1f} GiB "
                          f"(fp32 weights, gradients and optimizer state), but {available / 2**30:,.1f} GiB is "
                          f"available on {device}: choose a smaller model (model.d_model, n_layers, num_experts)")


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU has bf16 units (Ampere and later; any ROCm GPU). torch.cuda.is_bf16_supported()
    also says yes where bf16 is only emulated (a T4, a V100), and asks about the current device, not this."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast where the device has bf16 units; fp32 on CPU (bf16 matmul is ~100x slower there)."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and native_bf16(device))
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: MoETransformer, data_path: str, seq_len: int, batch_size: int, max_tokens: int,
             split: str = "heldout", device=None, amp=None) -> dict:
    """Held-out loss and perplexity per domain and overall (token-weighted)."""
    corpus = load_corpus(data_path)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    results, total_nll, total_n = {}, 0.0, 0
    for domain in corpus.domains:
        nll, n = 0.0, 0
        if not len(corpus.doc_ids(split, domain)):
            continue
        for batch in iter_sequential(corpus, seq_len=seq_len, batch_size=batch_size, split=split, domain=domain):
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            count = int((labels[:, 1:] != -100).sum())
            if count:
                # The chunked loss, as training's: the (B, S, V) fp32 logits would be 67 GB for a 256k
                # vocabulary at batch 8 x 2048.
                with amp or contextlib.nullcontext():
                    loss = model(ids, labels=labels, return_logits=False).loss
                nll += float(loss) * count
                n += count
            if n >= max_tokens:
                break
        if n:
            results[domain] = {"loss": nll / n, "ppl": math.exp(min(nll / n, 50)), "tokens": n}
            total_nll, total_n = total_nll + nll, total_n + n
    if total_n:
        results["all"] = {"loss": total_nll / total_n, "ppl": math.exp(min(total_nll / total_n, 50)),
                          "tokens": total_n}
    model.train(was_training)
    return results


def _freeze_routers(model: MoETransformer) -> None:
    for p in routing_parameters(model):
        p.requires_grad_(False)
        p.grad = None


def _step_metrics(out, loss_sum, grad_norm, lr, tokens, seconds) -> dict:
    m = {"loss": loss_sum, "aux_loss": float(out.aux_loss.detach()),
         "balance_loss": float(out.balance_loss.detach()),
         "z_loss": float(out.z_loss.detach()), "lr": lr, "grad_norm": grad_norm,
         "tokens_per_second": tokens / max(seconds, 1e-9)}
    if out.routing:
        m.update(routing_metrics(out.routing))
    return m


def _resume_step(resume_from: str | Path | None, steps: int) -> int:
    """The step a resumed run starts at; it must be before train.steps."""
    if resume_from is None:
        return 0
    read_checkpoint_config(resume_from)  # names a missing or foreign folder
    start = checkpoint_step(resume_from)
    if start >= steps:
        raise MoelabError(f"--resume {resume_from} is at step {start}, which is not before train.steps="
                          f"{steps}: raise --steps to continue training it")
    return start


def _prepare_out(out: Path, run: RunConfig, overwrite: bool, start: int, resume_from, inputs: dict):
    """Rank 0, before it writes: lock the folder (another run writing it is refused) and check it again
    under the lock, empty it when told to, drop crash leftovers and the metric rows of steps the resumed
    run will redo, then write the run config. Returns the lock, held until the run ends."""
    lock = lock_run_dir(out)
    try:  # a run that finished since the first check has filled the folder
        check_run_dir(out, overwrite=overwrite, resume_from=resume_from, resume_step=start, locked=True,
                      inputs=inputs)
    except MoelabError:
        lock.release()
        raise
    if overwrite:
        clear_run_dir(out)
    remove_leftovers(out)
    metrics = out / "metrics.jsonl"
    if start and metrics.is_file():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines(keepends=True)
                if _row_step(line) <= start]
        metrics.write_text("".join(rows), encoding="utf-8")
    (out / "config.json").write_text(run.to_json())
    return lock


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # an unreadable row (a write cut short) goes


def _build(run: RunConfig, source, device: torch.device) -> MoETransformer:
    """The run's model: drawn from train.seed, or, for --init and --resume, built on the meta device with the
    checkpoint's tensors as its parameters (`checkpoint.assign_weights`): a 7B model's random initialisation
    (about a minute) is not drawn only to be overwritten, nor held beside the weights. Nothing is drawn then,
    so the global RNG stays at train.seed (--resume goes on to restore the checkpoint's): an --init run with
    router jitter on CPU draws its noise from there, not from where an initialisation would have left it."""
    if source is None:
        return build_model(run.model, seed=run.train.seed).to(device)
    with torch.device("meta"):
        model = build_model(run.model)
    model = assign_weights(model, source).to(device)
    if device.type == "cpu":  # still the file's pages, mapped at whatever offset a tensor has in the file
        for t in [*model.parameters(), *model.buffers()]:
            # Into memory of its own, aligned as an allocation is: from the file (offsets 24 mod 64 seen),
            # a resumed run's weights drifted from the unbroken run's in the last bit within 3 steps.
            t.data = t.data.clone()
    return model


def _eval_row(model, ev: dict, world: int) -> dict:
    """The flat eval row, plus each MoE layer's mean pairwise expert cosine (copies diverging). Single
    process only: sharded or expert-parallel weights are not whole on any one rank."""
    return {**_flat_eval(ev), **(expert_cosine(model) if world == 1 else {})}


def _diverged(loss: float, grad_norm: float, step: int, result: TrainResult, resume_from) -> MoelabError:
    """A non-finite loss, or a non-finite gradient at a finite loss (one update would make every weight NaN)."""
    last = result.checkpoints[-1] if result.checkpoints else resume_from
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    what = (f"the loss is {loss}" if not math.isfinite(loss)
            else f"the gradient norm is {grad_norm} (at a finite loss {loss:.4g})")
    return MoelabError(f"training diverged: {what} at step {step}; stopped before that update, "
                       f"{keep} (lower train.lr or raise train.warmup_steps)")


def train(run: RunConfig, out_dir: str | Path, resume_from: str | Path | None = None,
          show_progress: bool = True, label: str = "train", overwrite: bool = False,
          init_from: str | Path | None = None, replay: str | Path | None = None,
          replay_split: str = "heldout") -> TrainResult:
    """Train `run` into the run folder `out_dir`, which must be empty unless `overwrite` (which empties
    it) or `resume_from` (which continues it); see `rundir.check_run_dir`. `init_from` starts from a
    checkpoint's weights at step 0 with a fresh optimizer. `replay`: train on a routing replay's sequences
    (rows of `replay_split`) with its routing forced (train/replay.py)."""
    t = run.train
    if init_from is not None and resume_from is not None:
        raise MoelabError("--init and --resume exclude each other (--resume continues a run, --init starts one)")
    out = Path(out_dir)
    start = _resume_step(resume_from, t.steps)
    inputs = {"--data": run.data.path, "--init": init_from, "--replay": replay}
    check_run_dir(out, overwrite=overwrite, resume_from=resume_from, resume_step=start, inputs=inputs)
    device = rank_device(resolve_device(t.device))  # under torchrun, this rank's own GPU
    check_train_fits(run, device)
    if t.threads:
        torch.set_num_threads(t.threads)
    corpus = load_corpus(run.data.path)
    check_vocab_fits(corpus.vocab_size, run.model.vocab_size)
    for ckpt in (init_from, resume_from):  # their token ids must mean the same tokens as the corpus's
        if ckpt is not None:
            check_same_tokenizer(ckpt, corpus)
    saved_config = {**run.to_dict(), "tokenizer": corpus_tokenizer(corpus)}
    if init_from is not None:  # another run's weights (an upcycled checkpoint, say) at step 0, a fresh optimizer
        check_architecture(init_from, run.model.to_dict(), "--init")
    if resume_from is not None:
        check_resumable(resume_from, run.model.to_dict())
    torch.manual_seed(t.seed)
    model = _build(run, init_from or resume_from, device)
    model.train()
    sampler = _sampler(run, corpus, model, replay, replay_split)
    opt = build_optimizer(model, t)
    # Before any parallel wrapping, so the comparison runs on the whole model (the same on every rank).
    change = step0_change(init_from, model, sampler.batch(0)["input_ids"][:4].to(device)) if init_from else None
    if resume_from is not None:  # the single-file checkpoint, whatever world size wrote it
        resume_checkpoint(resume_from, model, opt)
        if t.freeze_router_after is not None and start >= t.freeze_router_after:
            _freeze_routers(model)
    # Under torchrun: join the mesh, wrap the model, rebuild the optimizer over the wrapped parameters.
    pr, opt = ParallelRun.start(run.parallel, model, opt, lambda m: build_optimizer(m, t), device)
    model = pr.core
    if pr.main and not len(corpus.doc_ids("heldout")):  # training without held-out text is legitimate
        print(f"moelab: warning: corpus {run.data.path} has no documents in split 'heldout': nothing to "
              "evaluate, eval.json will be empty", file=sys.stderr)
    if replay is not None and pr.par.world > 1:
        raise MoelabError("--replay trains in one process: its forced routing is not sharded across ranks")
    if replay is not None and t.activation_checkpointing:  # the recompute runs after the replay's hooks are gone
        raise MoelabError("--replay and train.activation_checkpointing=true exclude each other (the backward's "
                          "recompute would route without the replayed routing)")
    # Refusals of the step options come before the folder is touched: a refused run leaves nothing behind
    # (it left config.json and metrics.jsonl, so the corrected command was refused as a non-empty --out).
    amp = autocast_for(device, t.dtype)
    mw = maybe_master_weights(model, t.param_dtype, not isinstance(amp, contextlib.nullcontext))
    apply_step_options(model, t.compile, t.activation_checkpointing)
    lock = _prepare_out(out, run, overwrite, start, resume_from, inputs) if pr.main else None  # only rank 0 writes
    logger = RunLogger(out, tensorboard=t.tensorboard) if pr.main else None
    if change is not None and logger:
        logger.log(0, change, "upcycle")
    result = TrainResult(out, out)
    tokens_per_step = run.data.batch_size * run.data.seq_len * t.grad_accum
    bar = Progress(t.steps - start, label) if show_progress and pr.main else None
    t0 = time.perf_counter()
    try:
        for step in range(start, t.steps):
            lr = lr_at(step, t)
            set_lr(opt, lr)
            step_t0 = time.perf_counter()
            loss_sum = 0.0
            for micro in range(t.grad_accum):
                batch = sampler.batch(step * t.grad_accum + micro)
                ids = pr.shard(batch["input_ids"]).to(device)  # this rank's rows of the global batch
                with amp, replay_routing(model, sampler, batch):
                    o = pr.model(ids, labels=pr.shard(batch["labels"]).to(device), return_routing=True,
                                   return_logits=False)
                    o = pr.with_balance(o, run.model.moe)
                ((o.loss + o.aux_loss) / t.grad_accum).backward()
                loss_sum += float(o.loss.detach()) / t.grad_accum
            pr.after_backward()
            if mw:  # bf16 params: the fp32 masters take the grads, clipping and the update
                mw.grads_to_master()
            gn = (mw or pr).clip(t.grad_clip if t.grad_clip > 0 else float("inf"))
            loss_sum = pr.mean(loss_sum)  # the same on every rank, so all stop together
            if not (math.isfinite(loss_sum) and math.isfinite(gn)):  # gn: the global norm, equal on every rank
                raise _diverged(loss_sum, gn, step + 1, result, resume_from)
            opt.step()
            if mw:
                mw.master_to_model()
            opt.zero_grad(set_to_none=True)
            pr.update_biases(o.routing)
            if t.freeze_router_after is not None and step + 1 == t.freeze_router_after:
                _freeze_routers(model)
            result.losses.append(loss_sum)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                m = pr.reduce(_step_metrics(o, loss_sum, gn, lr, tokens_per_step // pr.par.world,
                                            time.perf_counter() - step_t0))
                if logger:
                    logger.log(done, m)
            if t.save_every and done % t.save_every == 0 and done != t.steps:
                with mw.fp32_in_model() if mw else contextlib.nullcontext():
                    result.checkpoints.append(pr.save(
                        out / "checkpoints" / f"step_{done:06d}", saved_config, done, opt))
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                ev = _eval_row(model, evaluate(pr.eval_model, run.data.path, run.data.seq_len,
                                               run.data.batch_size, t.eval_tokens, amp=amp), pr.par.world)
                if logger:
                    logger.log(done, ev, "eval")
            if bar:
                bar.update(done - start, (done - start) * tokens_per_step, f"loss {loss_sum:.3f}")
        elapsed = time.perf_counter() - t0
        result.tokens_per_second = (t.steps - start) * tokens_per_step / max(elapsed, 1e-9)
        with mw.fp32_in_model() if mw else contextlib.nullcontext():
            final = pr.save(out / "checkpoints" / f"step_{t.steps:06d}", saved_config, t.steps, opt)
        result.checkpoints.append(final)
        result.final_checkpoint = final
        result.eval = evaluate(pr.eval_model, run.data.path, run.data.seq_len, run.data.batch_size,
                               t.eval_tokens, amp=amp)
        if logger:
            logger.log(t.steps, _eval_row(model, result.eval, pr.par.world), "eval")
            (out / "eval.json").write_text(json.dumps(result.eval, indent=2))
    finally:
        if bar:
            bar.close()
        if logger:
            logger.close()
        if lock:
            lock.release()
    return result


def _sampler(run: RunConfig, corpus, model, replay, split: str):
    """The data config's sampler (phased or not), or the replay's sequences in order."""
    if replay is None:
        return build_train_sampler(run.data, run.train.phases)
    if run.train.phases:
        raise MoelabError("--replay and train.phases exclude each other (the replay fixes the batches)")
    return ReplaySampler(corpus, seq_len=run.data.seq_len, batch_size=run.data.batch_size, split=split,
                         path=replay, model=model)


def corpus_tokenizer(corpus) -> dict:
    """What a checkpoint records of its corpus's tokenizer, so other corpora can be checked against it."""
    tok = corpus.info["tokenizer"]
    return {"fingerprint": tok.get("fingerprint"), "vocab_size": corpus.vocab_size,
            "file": str((corpus.path / tok["file"]).resolve())}


def _flat_eval(ev: dict) -> dict:
    return {f"{dom}/{k}": v for dom, vals in ev.items() for k, v in vals.items()}
