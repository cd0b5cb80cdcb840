"""A run's output folder: train_log.jsonl (one JSON record per step and per eval), loss.png drawn from it,
checkpoints/step-NNNNNN, and at the end the final model's files on top, so `--model OUT` loads it.

Every rank holds a RunFolder; only rank 0 writes the log, the plot and the final files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import CamelidError
from .options import TrainConfig


class RunFolder:
    def __init__(self, cfg: TrainConfig, rank: int):
        """Checks --resume / --force against what the folder holds (before the model loads): `resume_from` is the
        latest checkpoint to continue from, or None for a fresh run (whose old log and checkpoints rank 0 removes)."""
        self.out, self.rank, self.keep = Path(cfg.out), rank, cfg.keep_checkpoints
        self.log_path, self.png = self.out / "train_log.jsonl", self.out / "loss.png"
        self.resume_from: Path | None = None
        if cfg.resume:
            self.resume_from = ckpt.latest_checkpoint(self.out)
            if self.resume_from is None:
                raise CamelidError(f"--resume: {self.out} holds no checkpoint to resume from (checkpoints/step-*)")
            return
        if (self.log_path.exists() or (self.out / "checkpoints").exists()) and not cfg.force:
            raise CamelidError(f"{self.out} already holds a training run; pass --resume to continue it "
                               "or --force to start afresh")
        if rank == 0:
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def begin(self, start: int) -> None:
        """Make the folder (only now: a run that fails while setting up leaves no empty folder) and keep the
        log's records up to the step a resumed run starts from."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank != 0:
            return
        lines = self.log_path.read_text().splitlines() if self.log_path.is_file() else []
        kept = [line for line in lines if self.resume_from is not None and json.loads(line)["step"] <= start]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(self, step: int) -> Path:
        """Where the checkpoint of `step` goes."""
        folder = self.out / "checkpoints" / f"step-{step:06d}"
        folder.parent.mkdir(exist_ok=True)
        return folder

    def saved(self) -> None:
        """After a checkpoint: all but the --keep-checkpoints latest removed."""
        if self.rank == 0 and self.keep > 0:
            ckpt.prune(self.out, self.keep)

    def plot(self) -> None:
        if self.rank == 0:
            plot_losses(self.log_path, self.png)

    def finish(self, final: Path) -> None:
        """The final checkpoint's model files at the top of the folder, and the loss curves."""
        if self.rank == 0:
            ckpt.publish(final, self.out)
            plot_losses(self.log_path, self.png)


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
