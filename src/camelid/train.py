"""`camelid train`: full or LoRA fine-tuning on conversation JSONL, packed without cross-talk, with the loss
on the assistant's tokens only, or (pre-)training on every token of raw-text windows (text_data.py); one
process, or many under `torchrun` with FSDP2 (`fully_shard`).

Every optimizer step sees a global batch of batch_size x world_size x grad_accum packed rows, taken in a
seeded order that depends only on the step number, and the loss is the sum of token losses over the
global batch divided by its number of trained tokens. So 2 processes x batch B compute the same step as
1 process x batch 2B, and a resumed run the same steps as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import argtypes
from .errors import CamelidError
from .formats import manifest
from .packing import IGNORE, Packed, attention_mask, pack, read_conversations, tokenize


@dataclass
class TrainConfig:
    model: str | None = None
    data: str = ""
    out: str = ""
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    grad_checkpointing: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    force: bool = False
    seed: int = 0
    template: str | None = None
    text_data: str | list[str] | None = None  # token folders (`data tokenize`), DIR or DIR:WEIGHT each
    document_mask: bool = False
    dtype: str = "float32"
    threads: int | None = None
    quiet: bool = False


def _coerce(key: str, value: Any, where: str) -> Any:
    """A YAML value as the type the option takes, or one clear error."""
    kind = TrainConfig.__dataclass_fields__[key].type.split(" |")[0]
    if value is None or kind in ("str",):
        return value if value is None else str(value)
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        return {"int": int, "float": float}[kind](value)
    except (ValueError, TypeError):
        raise CamelidError(f"--config {where}: {key}: {value!r} is not a valid {kind}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file's keys (dashes or underscores), then the options given on the command line."""
    values: dict[str, Any] = {}
    names = {f.name for f in fields(TrainConfig)}
    if getattr(args, "config", None):
        import yaml
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CamelidError(f"--config {args.config}: cannot read YAML ({e})") from None
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise CamelidError(f"--config {args.config}: unknown key {key!r}")
            values[key] = _coerce(key, ",".join(map(str, value)) if key in ("lora_targets", "text_data")
                                  and isinstance(value, list) else value, args.config)
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            values[name] = value
    cfg = TrainConfig(**values)
    for need in ("data", "out"):
        if not getattr(cfg, need) and not (need == "data" and cfg.text_data):
            raise CamelidError(f"--{need} is required (on the command line or in --config)"
                               + ("; or --text-data for pre-training on raw text" if need == "data" else ""))
    if cfg.data and cfg.text_data:
        raise CamelidError("--data (conversations) and --text-data (raw text) cannot be combined; pick one")
    if cfg.document_mask and not cfg.text_data:
        raise CamelidError("--document-mask applies to --text-data (packed conversations never attend across examples)")
    return cfg


# ---- the pieces ---------------------------------------------------------------------------------------
def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to min_ratio x peak at the last step."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def score_cost(config: Any) -> float:
    """What one attention score costs next to one token through a block's linear layers (flops, both
    per layer): 4 x heads x head_dim for QK^T and PV, against 2 x the block's weights. ~1/3000 for SmolLM2."""
    d, hd = config.hidden_size, config.head_dim
    weights = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size
    return 4 * config.num_heads * hd / (2 * weights)


def unpad(tokens: Tensor, labels: Tensor, positions: Tensor, segments: Tensor,
          per_score: float = 1 / 3000) -> tuple[Tensor, ...]:
    """A batch of packed rows without its padding: the real tokens of all rows end to end in one row (1, n),
    segment ids made unique across rows so the block-diagonal mask keeps every example apart; or, when that
    costs more, the rows cut to the longest row's real length.

    Padding costs as much as a real token in every matrix product, and first-fit rows of short conversations
    are often only 70-80% full. But the attention kernel computes every score of a masked row, so one row of n
    tokens means n^2 scores against rows x length^2: the layout with fewer flops wins, a score counting
    `per_score` tokens (`score_cost`)."""
    real = segments >= 0
    n, (rows, seq) = int(real.sum()), segments.shape
    end = int(real.any(0).nonzero().max()) + 1
    if rows > 1 and n + n * n * per_score < rows * end * (1 + end * per_score):
        unique = segments + seq * torch.arange(rows, dtype=segments.dtype)[:, None]
        return tokens[real][None], labels[real][None], positions[real][None], unique[real][None]
    return tokens[:, :end], labels[:, :end], positions[:, :end], segments[:, :end]


def token_loss_sum(model: nn.Module, tokens: Tensor, labels: Tensor, positions: Tensor, segments: Tensor,
                   autocast: torch.dtype | None = None) -> Tensor:
    """Sum of cross-entropies over the trained tokens of packed rows (block-diagonal attention)."""
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    tokens, labels, positions, segments = unpad(tokens, labels, positions, segments,
                                                *([score_cost(config)] if config is not None else []))
    allowed = attention_mask(segments.to(device))
    # SDPA turns a boolean mask into an additive one in every layer and keeps each copy for the backward
    # (layers x rows x seq^2 floats); made once here, in the dtype attention computes in, the layers share it.
    mask = torch.zeros(allowed.shape, dtype=autocast or torch.float32, device=device)
    mask.masked_fill_(~allowed, float("-inf"))
    labels = labels.to(device).long()
    trained = labels != IGNORE  # logits only where a loss is taken: the vocabulary projection is costly
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(tokens.to(device).long(), positions.to(device).long(), mask, only=trained)
    return F.cross_entropy(logits.float(), labels[trained], reduction="sum")


def square_sum(t: Tensor, chunk: int = 1024) -> Tensor:
    """sum(t**2) in float64, without a float64 copy of t: fp32 norms of 1024-element pieces, squared and
    summed in float64. A plain fp32 norm of a 28M-element gradient is off by ~1e-3 on CPU; this by ~1e-9."""
    flat = t.detach().reshape(-1)
    n = flat.numel() // chunk * chunk
    pieces = torch.linalg.vector_norm(flat[:n].view(-1, chunk), dim=1).double().pow(2).sum() if n else 0.0
    return flat[n:].double().pow(2).sum() + pieces


def clip_gradients(params: list[Tensor], max_norm: float, world: int) -> float:
    """The global gradient norm (float64 sums of squares of each rank's shards, all-reduced), and clipping to
    max_norm. Casting whole gradients to float64 instead copied the model every step (a sixth of the step)."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        squares += square_sum(g.to_local() if hasattr(g, "to_local") else g).cpu()
    if world > 1:
        dist.all_reduce(squares)
    norm = float(squares.sqrt())
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (torch.utils.checkpoint per block). The block's
    forward is wrapped in place, so parameter names stay Hugging Face's."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


class Schedule:
    """Which packed rows each rank trains on at each step: a seeded permutation per epoch, global batches of
    batch x world rows, rank r taking its slice. Depends only on the step, so resuming needs no other state."""

    def __init__(self, n_rows: int, batch: int, world: int, accum: int, seed: int):
        self.batch, self.world, self.accum, self.seed = batch, world, accum, seed
        self.per_epoch = n_rows // (batch * world)
        if self.per_epoch < accum:
            raise CamelidError(f"{n_rows} packed rows are too few for one step of batch {batch} x {world} processes "
                               f"x grad-accum {accum}; lower --batch-size / --grad-accum or add data")
        self.steps_per_epoch = self.per_epoch // accum
        self._perm: tuple[int, Tensor] | None = None

    def rows(self, step: int, micro: int) -> Tensor:
        """All rows (every rank's) of one micro-batch."""
        epoch, j = divmod(step * self.accum + micro, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm = (epoch, torch.randperm(self.per_epoch * self.batch * self.world, generator=g))
        size = self.batch * self.world
        return self._perm[1][j * size:(j + 1) * size]

    def mine(self, rows: Tensor, rank: int) -> Tensor:
        return rows[rank * self.batch:(rank + 1) * self.batch]


def load_data(cfg: TrainConfig, template: Any, tokenizer: Any, split: str) -> Packed | None:
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


def setup_distributed() -> tuple[int, int, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): a process group (NCCL on GPUs, else gloo) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def shard(model: nn.Module, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def plot_losses(log_path: Path, png: Path) -> None:
    """Train and eval loss curves from the JSONL log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, evals = [], []
    for line in log_path.read_text().splitlines():
        r = json.loads(line)
        (evals if "eval_loss" in r else train).append(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per trained token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


# ---- the loop -------------------------------------------------------------------------------------------
def _template(cfg: TrainConfig, loaded: Any, rank: int) -> tuple[Any, Any]:
    """The template the data is rendered with, and what camelid.json records so chat uses the same one."""
    from .chat import template_for
    model_dir = loaded.source if loaded.source.is_dir() else None
    template, notice = template_for(loaded.source, loaded.chat_template, loaded.name, cfg.template,
                                    tokenizer=loaded.tokenizer)
    if notice and rank == 0:
        print(notice, file=sys.stderr)
    recorded: Any = template.name
    if not cfg.template and model_dir is not None:
        recorded = manifest.field(model_dir, "chat_template") or recorded
    return template, recorded


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


def _check_options(cfg: TrainConfig) -> None:
    """Options that can be wrong without loading the model, checked before it loads."""
    from .lora import ALL_TARGETS
    if cfg.lora_rank is not None:
        targets = [t.strip() for t in (cfg.lora_targets or "").split(",") if t.strip()]
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown or not targets:
            raise CamelidError(f"--lora-targets: unknown module {(unknown[0] if unknown else cfg.lora_targets)!r} "
                               f"(choose from {', '.join(ALL_TARGETS)})")
        if cfg.lora_rank < 1:
            raise CamelidError(f"--lora-rank {cfg.lora_rank}: must be at least 1")
    from .chat import check_template_name
    check_template_name(cfg.template)


def _prepare_out(cfg: TrainConfig, rank: int) -> tuple[Path, Path | None]:
    out = Path(cfg.out)
    if cfg.resume:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            raise CamelidError(f"--resume: {out} holds no checkpoint to resume from (checkpoints/step-*)")
        return out, found
    if (out / "train_log.jsonl").exists() or (out / "checkpoints").exists():
        if not cfg.force:
            raise CamelidError(f"{out} already holds a training run; pass --resume to continue it or --force to start afresh")
    if rank == 0:
        import shutil
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    return out, None


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run a training job; returns its losses and figures. `stop_after` ends the run after that many steps
    as an interruption would (checkpoints already written stay; used to test --resume)."""
    from tqdm import tqdm
    from .engine import load_model
    from .lora import apply_lora
    rank, world, device = setup_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_options(cfg)
    out, resume_from = _prepare_out(cfg, rank)
    loaded = load_model(cfg.model, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise CamelidError(f"{loaded.source}: no tokenizer beside the weights; training needs one")
    try:
        template, template_name = _template(cfg, loaded, rank)
    except CamelidError:
        if not cfg.text_data or cfg.template:
            raise
        template, template_name = None, None  # a base model pre-trains on raw text without a chat template
    if cfg.text_data:
        from .text_data import TextWindows
        data = TextWindows(cfg.text_data, cfg.seq_len, tokenizer_sha=loaded.tokenizer.fingerprint(),
                           document_mask=cfg.document_mask, seed=cfg.seed)
        eval_data = None
    else:
        data = load_data(cfg, template, loaded.tokenizer, "train")
        eval_data = load_data(cfg, template, loaded.tokenizer, "eval")
    model, lora = loaded.model, cfg.lora_rank is not None
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every rank
    if lora:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()])
    if resume_from is not None:
        ckpt.load_weights_into(model, resume_from, lora)
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model.to(device).train()
    if world > 1:
        shard(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    embed = model.model.embed_tokens
    if world == 1 and not lora and model.lm_head.weight is embed.weight:
        # Tied input/output matrix: the lookup's gradient as the few rows it touches, added by autograd into the
        # output projection's dense gradient, instead of a zeroed vocab x hidden matrix summed with it each step.
        embed.sparse = True
    # One fused kernel per step (CPU and CUDA) when parameters are plain tensors; sharded ones take foreach.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if world == 1 else {"foreach": True}))
    schedule = Schedule(len(data), cfg.batch_size, world, cfg.grad_accum, cfg.seed)
    total = cfg.max_steps or max(1, int(cfg.epochs * schedule.steps_per_epoch))
    schedule_fn = lr_lambda(cfg.warmup, total, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn)
    start = 0
    torch.manual_seed(cfg.seed + rank)  # dropout streams differ per rank
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.load_rank_state(resume_from, optimizer)
        start = state["step"]
        # The schedule of this run (it may have another --max-steps than the one saved) at the step reached.
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * schedule_fn(start)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    log_path, png = out / "train_log.jsonl", out / "loss.png"
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails while setting up leaves no empty folder
    if rank == 0:
        kept = [l for l in (log_path.read_text().splitlines() if log_path.is_file() else [])
                if resume_from is not None and json.loads(l)["step"] <= start]
        log_path.write_text("".join(l + "\n" for l in kept))
        described = data.describe() if cfg.text_data else (
            f"{template.name} template; {data.examples} examples in {len(data)} rows of {cfg.seq_len} "
            f"({data.stats['fill']:.0%} full), {data.truncated} truncated, {data.dropped} without a reply dropped")
        print(f"camelid train: {loaded.name}, {'LoRA r=%d' % cfg.lora_rank if lora else 'full'}, {described}; "
              f"{world} process(es), {total} steps", file=sys.stderr)

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step: int) -> Path:
        folder = out / "checkpoints" / f"step-{step:06d}"
        folder.parent.mkdir(exist_ok=True)
        extra = {"trained_by": "camelid train", "step": step, "base_model": str(loaded.source), "lora": lora}

        def state(f: Path) -> None:
            ckpt.write_state(f, step=step, optimizer=optimizer, scheduler=scheduler, info={"config": asdict(cfg)})
        if lora:
            ckpt.save_adapter_checkpoint(model, loaded, folder, template_name=template_name, extra=extra, state=state)
        else:
            ckpt.save_model(model, loaded, folder, template_name=template_name, force=True, extra=extra, state=state)
        if rank == 0 and cfg.keep_checkpoints > 0:
            ckpt.prune(out, cfg.keep_checkpoints)
        return folder

    autocast = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    losses: list[float] = []
    speeds: list[float] = []
    saved_at = evaled_at = -1
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=cfg.quiet or rank != 0)
    step = start
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        micro = [schedule.rows(step - 1, k) for k in range(cfg.grad_accum)]
        n_tok = sum(data.trained_tokens(r) for r in micro)
        stats = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens processed
        for rows in micro:
            tokens, labels, positions, segments = data.batch(schedule.mine(rows, rank))
            part = token_loss_sum(model, tokens, labels, positions, segments, autocast)
            # FSDP averages gradients over ranks; x world undoes that, so the global sum / n_tok is what counts.
            (part * (world / max(1, n_tok))).backward()
            stats += torch.tensor([float(part.detach()), float((segments >= 0).sum())], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        norm = clip_gradients(params, cfg.max_grad_norm, world)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(stats[0]) / max(1, n_tok)
        speed = float(stats[1]) / (time.perf_counter() - t0)
        losses.append(loss)
        speeds.append(speed)
        log({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": speed,
             "epoch": (step * cfg.grad_accum) / schedule.per_epoch})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}")
        if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
            log({"step": step, "eval_loss": evaluate(model, eval_data, cfg.batch_size, rank, world, autocast)})
            evaled_at = step
            if rank == 0:
                plot_losses(log_path, png)
        if cfg.save_every and step % cfg.save_every == 0:
            save(step)
            saved_at = step
        if stop_after is not None and step - start >= stop_after:
            bar.close()
            return {"rank": rank, "steps": step, "losses": losses, "out": out, "interrupted": True}
    bar.close()
    ran = step > start
    if eval_data is not None and evaled_at != step and ran:
        log({"step": step, "eval_loss": evaluate(model, eval_data, cfg.batch_size, rank, world, autocast)})
    final = out / "checkpoints" / f"step-{step:06d}"
    if saved_at != step and ran:
        final = save(step)
    elif not ran:
        final = resume_from if resume_from is not None else final
    if rank == 0:
        ckpt.publish(final, out)
        plot_losses(log_path, png)
    if world > 1:
        dist.barrier()
    speeds = sorted(speeds[1:] or speeds)
    return {"rank": rank, "steps": step, "losses": losses, "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "out": out,
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else 0.0}

# ---- command --------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune a model (full or LoRA) on conversation JSONL (DIR/train.jsonl, DIR/eval.jsonl), or pre-train
    on raw text (--text-data, folders from `camelid data tokenize`); under `torchrun --nproc-per-node N` the same
    command trains data-parallel with FSDP2."""
    try:
        result = train(config_from_args(args))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result["rank"] == 0 and not result["losses"]:
        print(f"nothing to train: the run is already at step {result['steps']}; wrote {result['out']}", file=sys.stderr)
    elif result["rank"] == 0:
        print(f"trained {result['steps']} steps: loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}; "
              f"wrote {result['out']}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--model", help="base model: GGUF file or HF folder (default: the built-in SmolLM2-135M-Instruct)")
    add("--data", help="folder with train.jsonl (and eval.jsonl), as `camelid data prepare` writes")
    add("--out", help="output folder: checkpoints/, train_log.jsonl, loss.png and the final model")
    add("--config", help="YAML file with any of these options (keys as the option names)")
    add("--seq-len", type=argtypes.positive_int, help="packed row length (default 512)")
    add("--batch-size", type=argtypes.positive_int, help="rows per process per micro-batch (default 4)")
    add("--grad-accum", type=argtypes.positive_int, help="micro-batches per optimizer step (default 1)")
    add("--lr", type=argtypes.positive_float, help="peak learning rate (default 2e-5)")
    add("--warmup", type=argtypes.non_negative_int, help="linear warmup steps (default 0)")
    add("--min-lr-ratio", type=argtypes.non_negative_float, help="cosine decays to this fraction of the peak (default 0)")
    add("--weight-decay", type=argtypes.non_negative_float, help="AdamW weight decay (default 0)")
    add("--max-grad-norm", type=argtypes.non_negative_float, help="gradient clipping (default 1.0; 0 = off)")
    add("--epochs", type=argtypes.positive_float, help="passes over the data (default 1)")
    add("--max-steps", type=argtypes.positive_int, help="optimizer steps (overrides --epochs)")
    add("--lora-rank", type=argtypes.positive_int, help="train a LoRA adapter of this rank instead of all weights")
    add("--lora-alpha", type=argtypes.positive_float, help="LoRA alpha (default 16)")
    add("--lora-dropout", type=float, help="LoRA dropout (default 0)")
    add("--lora-targets", help="comma-separated linear layers (default q_proj,v_proj)")
    add("--grad-checkpointing", action="store_true", help="recompute activations per block (less memory)")
    add("--eval-every", type=argtypes.positive_int, help="eval loss every N steps (and at the end)")
    add("--save-every", type=argtypes.positive_int, help="checkpoint every N steps (and at the end)")
    add("--keep-checkpoints", type=argtypes.non_negative_int, help="how many of the latest checkpoints to keep (default 2; 0 = all)")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add("--force", action="store_true", help="start afresh even if --out holds a run")
    add("--seed", type=int, help="seed for data order and initialisation (default 0)")
    add("--template", help="conversation template (default: the model's own)")
    add("--text-data", nargs="+", metavar="DIR[:WEIGHT]",
        help="pre-train on raw text instead: folders made by `camelid data tokenize`, windows of --seq-len drawn "
             "from each in proportion to its WEIGHT (default 1); every token is trained")
    add("--document-mask", action="store_true",
        help="with --text-data: no attention across document boundaries within a window")
    add("--dtype", choices=("float32", "bfloat16"), help="compute dtype: bfloat16 = autocast, fp32 master weights")
    add("--threads", type=argtypes.positive_int, help="CPU threads per process")
    add("--quiet", action="store_true", help="no progress bar")
