"""`camelid train`: full or LoRA fine-tuning on conversation JSONL, packed without cross-talk, with the loss
on the assistant's tokens only, or (pre-)training on every token of raw-text windows (text_data.py); one
process, or many under `torchrun` with FSDP2 (`fully_shard`).

Every optimizer step sees a global batch of batch_size x world_size x grad_accum packed rows, taken in a
seeded order that depends only on the step number, and the loss is the sum of token losses over the
global batch divided by its number of trained tokens. So 2 processes x batch B compute the same step as
1 process x batch 2B, and a resumed run the same steps as an uninterrupted one.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..device import set_threads
from ..errors import CamelidError
from ..packing import Packed, pack, read_conversations, tokenize
from .distributed import setup_distributed, shard
from .loss import clip_gradients, token_loss_sum
from .options import TrainConfig, check_options
from .run import RunFolder
from .schedule import Schedule, lr_lambda


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run a training job; returns its losses and figures. `stop_after` ends the run after that many steps
    as an interruption would (checkpoints already written stay; used to test --resume)."""
    rank, world, device = setup_distributed(cfg.device)
    set_threads(cfg.threads)
    check_options(cfg)
    folder = RunFolder(cfg, rank)
    described = ckpt.read_description(cfg.model)  # a bad camelid.json: one clear error before the model loads
    loaded = _load(cfg)
    template, template_name = _template(cfg, loaded, described, rank)
    data, eval_data = _datasets(cfg, template, loaded)
    trainer = Trainer(cfg, loaded, data, eval_data, folder, template_name, rank, world, device)
    folder.begin(trainer.start)
    if rank == 0:
        print(_banner(cfg, loaded, template, data, world, trainer.total), file=sys.stderr)
    return trainer.run(stop_after)


# ---- setting up -----------------------------------------------------------------------------------------
def _load(cfg: TrainConfig) -> Any:
    """The base model in float32 (the master weights), with its tokenizer."""
    import inspect
    from ..engine import load_model
    given = {"config": cfg.model_config, "tokenizer": cfg.tokenizer}
    options = {key: value for key, value in given.items() if value}
    # (Until the loader that opens every format convert reads is merged, it takes neither.)
    unknown = [key for key in options if key not in inspect.signature(load_model).parameters]
    if unknown:
        raise CamelidError(f"--{unknown[0]}: this camelid's loader cannot take one yet; convert the model to an "
                           "HF folder first (`camelid convert SRC OUT --to hf --config ... --tokenizer ...`)")
    loaded = load_model(cfg.model, dtype=torch.float32, **options)
    if loaded.tokenizer is None:
        raise CamelidError(f"{loaded.source}: no tokenizer beside the weights; training needs one (--tokenizer)")
    return loaded


def _template(cfg: TrainConfig, loaded: Any, described: dict[str, Any], rank: int) -> tuple[Any, Any]:
    """The template the data is rendered with, and what camelid.json records so chat uses the same one. A base
    model pre-trains on raw text (--text-data) without one."""
    try:
        template, notice = loaded.template(cfg.template)
    except CamelidError:
        if not cfg.text_data or cfg.template:
            raise
        return None, None
    if notice and rank == 0:
        print(notice, file=sys.stderr)
    recorded = None if cfg.template else described.get("chat_template")
    return template, recorded or template.name


def load_data(cfg: TrainConfig, template: Any, tokenizer: Any, split: str) -> Packed | None:
    """DIR/{split}.jsonl rendered with the template and packed into rows of --seq-len (eval may be absent)."""
    path = Path(cfg.data) / f"{split}.jsonl"
    if not path.is_file():
        if split == "train":
            raise CamelidError(f"{path}: no such file; --data is a folder made by `camelid data prepare` "
                               "(train.jsonl, eval.jsonl)")
        return None
    records = read_conversations(path)
    if not records:
        if split == "train":
            raise CamelidError(f"{path}: holds no conversations")
        return None
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    return pack(tokenize(records, template, tokenizer, str(path)), cfg.seq_len, pad_id=pad, seed=cfg.seed)


def _datasets(cfg: TrainConfig, template: Any, loaded: Any) -> tuple[Any, Packed | None]:
    """(training rows, eval rows or None): packed conversations, or raw-text windows (no eval split)."""
    if cfg.text_data:
        from ..text_data import TextWindows
        return TextWindows(cfg.text_data, cfg.seq_len, tokenizer_sha=loaded.tokenizer.fingerprint(),
                           document_mask=cfg.document_mask, seed=cfg.seed), None
    return (load_data(cfg, template, loaded.tokenizer, "train"),
            load_data(cfg, template, loaded.tokenizer, "eval"))


def _prepare_model(cfg: TrainConfig, model: nn.Module, resume_from: Path | None, device: torch.device,
                   world: int) -> nn.Module:
    """LoRA layers swapped in (when asked), a checkpoint's weights copied in (when resuming), then moved to the
    device and sharded (under torchrun)."""
    from ..lora import apply_lora
    lora = cfg.lora_rank is not None
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every rank
    if lora:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=cfg.lora_target_list())
    if resume_from is not None:
        ckpt.load_weights_into(model, resume_from, lora)
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model.to(device).train()
    if world > 1:
        shard(model, device)
    embed = model.model.embed_tokens
    if world == 1 and not lora and model.lm_head.weight is embed.weight:
        # Tied input/output matrix: the lookup's gradient as the few rows it touches, added by autograd into the
        # output projection's dense gradient, instead of a zeroed vocab x hidden matrix summed with it each step.
        embed.sparse = True
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (torch.utils.checkpoint per block). The block's
    forward is wrapped in place, so parameter names stay Hugging Face's."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def _banner(cfg: TrainConfig, loaded: Any, template: Any, data: Any, world: int, total: int) -> str:
    described = data.describe() if cfg.text_data else (
        f"{template.name} template; {data.examples} examples in {len(data)} rows of {cfg.seq_len} "
        f"({data.stats['fill']:.0%} full), {data.truncated} truncated, {data.dropped} without a reply dropped")
    kind = f"LoRA r={cfg.lora_rank}" if cfg.lora_rank is not None else "full"
    return f"camelid train: {loaded.name}, {kind}, {described}; {world} process(es), {total} steps"


# ---- the run --------------------------------------------------------------------------------------------
class Trainer:
    """The model, optimizer and schedules of one run, and its steps, evals and checkpoints."""

    def __init__(self, cfg: TrainConfig, loaded: Any, data: Any, eval_data: Packed | None, folder: RunFolder,
                 template_name: Any, rank: int, world: int, device: torch.device):
        self.cfg, self.loaded, self.data, self.eval_data, self.folder = cfg, loaded, data, eval_data, folder
        self.template_name, self.rank, self.world = template_name, rank, world
        self.lora = cfg.lora_rank is not None
        self.model = _prepare_model(cfg, loaded.model, folder.resume_from, device, world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # One fused kernel per step (CPU and CUDA) when parameters are plain tensors; sharded ones take foreach.
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           **({"fused": True} if world == 1 else {"foreach": True}))
        self.schedule = Schedule(len(data), cfg.batch_size, world, cfg.grad_accum, cfg.seed)
        self.total = cfg.max_steps or max(1, int(cfg.epochs * self.schedule.steps_per_epoch))
        self.lr_at = lr_lambda(cfg.warmup, self.total, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)
        self.autocast = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        torch.manual_seed(cfg.seed + rank)  # dropout streams differ per rank (a resumed run restores its own)
        self.start = self._resume(folder.resume_from) if folder.resume_from is not None else 0

    def _resume(self, checkpoint: Path) -> int:
        """Optimizer, scheduler and RNG as the checkpoint saved them; returns its step."""
        state = ckpt.read_state(checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.load_rank_state(checkpoint, self.optimizer)
        start = state["step"]
        # The schedule of this run (it may have another --max-steps than the one saved) at the step reached.
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.lr_at(start)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        return start

    def run(self, stop_after: int | None) -> dict[str, Any]:
        cfg, losses, speeds = self.cfg, [], []
        saved_at = evaled_at = -1
        bar = tqdm(total=self.total, initial=self.start, desc="train", unit="step",
                   disable=cfg.quiet or self.rank != 0)
        step = self.start
        for step in range(self.start + 1, self.total + 1):
            loss, speed = self.step(step)
            losses.append(loss)
            speeds.append(speed)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}")
            if self.eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                evaled_at = self.log_eval(step)
                self.folder.plot()
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(step)
                saved_at = step
            if stop_after is not None and step - self.start >= stop_after:
                bar.close()
                return {"rank": self.rank, "steps": step, "losses": losses, "out": self.folder.out,
                        "interrupted": True}
        bar.close()
        self.finish(step, saved_at, evaled_at)
        speeds = sorted(speeds[1:] or speeds)  # the first step warms up: left out of the median
        return {"rank": self.rank, "steps": step, "losses": losses, "out": self.folder.out,
                "first_loss": losses[0] if losses else float("nan"),
                "last_loss": losses[-1] if losses else float("nan"),
                "tokens_per_s": speeds[len(speeds) // 2] if speeds else 0.0}

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step over --grad-accum micro-batches, logged; (loss per trained token, tokens/s)."""
        t0 = time.perf_counter()
        micro = [self.schedule.rows(step - 1, k) for k in range(self.cfg.grad_accum)]
        n_tok = sum(self.data.trained_tokens(r) for r in micro)
        stats = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens processed
        for rows in micro:
            tokens, labels, positions, segments = self.data.batch(self.schedule.mine(rows, self.rank))
            part = token_loss_sum(self.model, tokens, labels, positions, segments, self.autocast)
            # FSDP averages gradients over ranks; x world undoes that, so the global sum / n_tok is what counts.
            (part * (self.world / max(1, n_tok))).backward()
            stats += torch.tensor([float(part.detach()), float((segments >= 0).sum())], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        norm = clip_gradients(self.params, self.cfg.max_grad_norm, self.world)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(stats[0]) / max(1, n_tok)
        speed = float(stats[1]) / (time.perf_counter() - t0)
        self.folder.log({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": speed,
                         "epoch": (step * self.cfg.grad_accum) / self.schedule.per_epoch})
        return loss, speed

    def log_eval(self, step: int) -> int:
        """The eval loss, logged; returns the step."""
        loss = evaluate(self.model, self.eval_data, self.cfg.batch_size, self.rank, self.world, self.autocast)
        self.folder.log({"step": step, "eval_loss": loss})
        return step

    def save(self, step: int) -> Path:
        """A checkpoint: the model (or the adapter) with the trainer state that --resume reads."""
        folder = self.folder.checkpoint(step)
        extra = {"trained_by": "camelid train", "step": step, "base_model": str(self.loaded.source),
                 "lora": self.lora}

        def state(f: Path) -> None:
            ckpt.write_state(f, step=step, optimizer=self.optimizer, scheduler=self.scheduler,
                             info={"config": asdict(self.cfg)})
        save = ckpt.save_adapter_checkpoint if self.lora else ckpt.save_model
        save(self.model, self.loaded, folder, template_name=self.template_name, force=True, extra=extra, state=state)
        self.folder.saved()
        return folder

    def finish(self, step: int, saved_at: int, evaled_at: int) -> None:
        """The last eval and checkpoint (unless the last step made them), published at the top of the folder."""
        ran = step > self.start  # a resumed run that was already at its last step runs none
        if self.eval_data is not None and evaled_at != step and ran:
            self.log_eval(step)
        if not ran:
            final = self.folder.resume_from
        else:
            final = self.folder.checkpoint(step) if saved_at == step else self.save(step)
        self.folder.finish(final)
        if self.world > 1:
            dist.barrier()


def evaluate(model: nn.Module, rows: Packed, batch: int, rank: int, world: int, autocast: torch.dtype | None) -> float:
    """Mean loss per trained token over all eval rows; every rank runs the same number of forwards."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    size = batch * world
    with torch.no_grad():
        for start in range(0, len(rows), size):
            idx = torch.arange(start, min(start + size, len(rows)))
            mine, weight = idx[rank * batch:(rank + 1) * batch], 1.0
            if len(mine) == 0:  # FSDP needs every rank in every forward: run one row and count nothing
                mine, weight = idx[:1], 0.0
            total += weight * token_loss_sum(model, rows.tokens[mine], rows.labels[mine], rows.positions[mine],
                                             rows.segments[mine], autocast).double().cpu()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total) / max(1, rows.trained_tokens())
