"""`camelid train` (fine-tuning, pre-training, under torchrun with FSDP2) and `camelid lora merge`.

Only argparse and printing here, and no torch at import: `camelid train --help` answers at once. The option
defaults shown in --help are TrainConfig's; options are left None here so that an options file's values hold
where the command line says nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import argtypes
from ..errors import CamelidError
from ..train.options import default, is_options_file
from .options import QUIET_HELP


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune a model (full or LoRA) on conversation JSONL (DIR/train.jsonl, DIR/eval.jsonl), or pre-train
    on raw text (--text-data, folders from `camelid data tokenize`); under `torchrun --nproc-per-node N` the same
    command trains data-parallel with FSDP2."""
    from ..train.distributed import teardown
    from ..train.loop import train
    from ..train.options import config_from_args
    _read_old_config_spelling(args)
    cfg = config_from_args(args)
    try:
        result = train(cfg)
    finally:
        teardown()
    if result["rank"] != 0:
        return
    if not result["losses"]:
        print(f"nothing to train: the run is already at step {result['steps']}; wrote {result['out']}", file=sys.stderr)
    else:
        print(f"trained {result['steps']} steps: loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}; "
              f"wrote {result['out']}", file=sys.stderr)


def _read_old_config_spelling(args: argparse.Namespace) -> None:
    """`--config FILE.yaml` named train's options file before --options did; it still does, with a notice."""
    if not is_options_file(args.config):
        return
    if args.options:
        raise CamelidError(f"--config {args.config} and --options {args.options}: both name an options file; "
                           "keep --options (--config names the model config)")
    if os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        print(f"camelid: --config {args.config}: a YAML options file is now given as --options (--config names the "
              "model config, as in convert); reading it as --options", file=sys.stderr)
    args.options, args.config = args.config, None


def cmd_lora_merge(args: argparse.Namespace) -> None:
    """Merge a LoRA adapter folder into its base model and write a full HF model folder."""
    from ..checkpoint import merge_adapter
    base = merge_adapter(Path(args.adapter), Path(args.out), base=args.base, force=args.force,
                         progress=not args.quiet)
    print(f"wrote {args.out}: {base} + {args.adapter}")


def _defaulted(name: str, text: str) -> str:
    return f"{text} (default: {default(name)})"


def _add_model_and_run(add) -> None:
    add("--model", help="base model: GGUF file or model folder (default: the built-in SmolLM2-135M-Instruct)")
    add("--config", help="model config where --model carries none (a `params::` EasyLM file): preset (7b, "
                         "llama-2-7b ...) or a config.json / params.json path; a .yaml file here is read as --options")
    add("--tokenizer", help="tokenizer where --model carries none: tokenizer.json / tokenizer.model, a folder, "
                            "or a .gguf / .flm whose vocabulary to use")
    add("--options", metavar="FILE", help="YAML file with any of these options (keys as the option names); "
                                          "the command line overrides it")
    add("--data", help="folder with train.jsonl (and eval.jsonl), as `camelid data prepare` writes")
    add("--out", help="output folder: checkpoints/, train_log.jsonl, loss.png and the final model")
    add("--text-data", nargs="+", metavar="DIR[:WEIGHT]",
        help="pre-train on raw text instead: folders made by `camelid data tokenize`, windows of --seq-len drawn "
             "from each in proportion to its WEIGHT (default 1); every token is trained")
    add("--document-mask", action="store_true",
        help="with --text-data: no attention across document boundaries within a window")
    add("--template", help="conversation template (default: the model's own)")
    add("--device", help=_defaulted("device", "cpu, cuda or auto (CUDA when a GPU is present); under torchrun "
                                              "each process takes the GPU of its LOCAL_RANK"))
    add("--dtype", choices=("float32", "bfloat16"),
        help=_defaulted("dtype", "compute dtype: bfloat16 = autocast, fp32 master weights"))
    add("--threads", type=argtypes.positive_int, help="CPU threads per process (default: torch's choice)")
    add("--quiet", action="store_true", help=QUIET_HELP)


def _add_optimization(add) -> None:
    add("--seq-len", type=argtypes.positive_int, help=_defaulted("seq_len", "packed row length"))
    add("--batch-size", type=argtypes.positive_int, help=_defaulted("batch_size", "rows per process per micro-batch"))
    add("--grad-accum", type=argtypes.positive_int, help=_defaulted("grad_accum", "micro-batches per optimizer step"))
    add("--lr", type=argtypes.positive_float, help=_defaulted("lr", "peak learning rate"))
    add("--warmup", type=argtypes.non_negative_int, help=_defaulted("warmup", "linear warmup steps"))
    add("--min-lr-ratio", type=argtypes.non_negative_float,
        help=_defaulted("min_lr_ratio", "cosine decays to this fraction of the peak"))
    add("--weight-decay", type=argtypes.non_negative_float, help=_defaulted("weight_decay", "AdamW weight decay"))
    add("--max-grad-norm", type=argtypes.non_negative_float,
        help=_defaulted("max_grad_norm", "gradient clipping; 0 = off"))
    add("--epochs", type=argtypes.positive_float, help=_defaulted("epochs", "passes over the data"))
    add("--max-steps", type=argtypes.positive_int, help="optimizer steps (overrides --epochs)")
    add("--grad-checkpointing", action="store_true", help="recompute activations per block (less memory)")
    add("--seed", type=int, help=_defaulted("seed", "seed for data order and initialisation"))


def _add_lora_and_checkpoints(add) -> None:
    add("--lora-rank", type=argtypes.positive_int, help="train a LoRA adapter of this rank instead of all weights")
    add("--lora-alpha", type=argtypes.positive_float, help=_defaulted("lora_alpha", "LoRA alpha"))
    add("--lora-dropout", type=float, help=_defaulted("lora_dropout", "LoRA dropout"))
    add("--lora-targets", help=_defaulted("lora_targets", "comma-separated linear layers"))
    add("--eval-every", type=argtypes.positive_int, help="eval loss every N steps (and at the end)")
    add("--save-every", type=argtypes.positive_int, help="checkpoint every N steps (and at the end)")
    add("--keep-checkpoints", type=argtypes.non_negative_int,
        help=_defaulted("keep_checkpoints", "how many of the latest checkpoints to keep; 0 = all"))
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add("--force", action="store_true", help="start afresh even if --out holds a run")


def _add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output model folder")
    p.add_argument("--base", help="base model (default: the one adapter_config.json names)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    for add_group in (_add_model_and_run, _add_optimization, _add_lora_and_checkpoints):
        add_group(p.add_argument)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("lora", help="LoRA adapters: `camelid lora merge ADAPTER_DIR OUT`")
    actions = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    q = actions.add_parser("merge", help=cmd_lora_merge.__doc__, description=cmd_lora_merge.__doc__)
    _add_merge_arguments(q)
    q.set_defaults(func=cmd_lora_merge)
