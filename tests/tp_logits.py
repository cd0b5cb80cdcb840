"""Run under torchrun by tests/test_tp.py: logits of a prefill and 32 greedy decode steps through the
tensor-parallel model, saved by rank 0.   torchrun --nproc-per-node N tests/tp_logits.py MODEL OUT.pt"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from camelid import tp

PROMPT = [1, 450, 11148, 3304, 20255, 975, 278, 17366, 3489, 29889, 13, 1576]


def greedy_logits(model: torch.nn.Module, prompt: list[int], steps: int = 32) -> torch.Tensor:
    """Last-position logits of the prompt, then of each greedy token fed back one at a time."""
    with torch.inference_mode():
        model.setup_cache(1, len(prompt) + steps + 1)
        out = [model(torch.tensor([prompt]), torch.arange(len(prompt)))[0, -1]]
        for i in range(steps):
            token = int(out[-1].argmax())
            out.append(model(torch.tensor([[token]]), torch.tensor([len(prompt) + i]))[0, -1])
    return torch.stack(out)


if __name__ == "__main__":
    model_path, out = sys.argv[1], sys.argv[2]
    loaded = tp.load_sharded(None if model_path == "builtin" else model_path, int(os.environ["WORLD_SIZE"]))
    logits = greedy_logits(loaded.model, PROMPT)
    if dist.get_rank() == 0:
        torch.save(logits, out)
    dist.destroy_process_group()
