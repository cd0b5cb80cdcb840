"""Write a 1.1B LLaMA-shaped model with random weights (TinyLlama's dimensions: 22 layers, hidden 2048,
intermediate 5632, 32 heads, 4 kv heads, vocabulary 32000) as a bf16 HF folder with transformers, and convert it
with `camelid convert --to gguf --quant q4_0|q8_0`, for the speed benchmarks (no model hub needed).

    python benchmarks/tinyllama_shape.py OUT_DIR     # -> OUT_DIR/hf, OUT_DIR/tiny1b.Q4_0.gguf, OUT_DIR/tiny1b.Q8_0.gguf
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: Path) -> None:
    hf = out / "hf"
    if not (hf / "config.json").exists():
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for name, p in model.named_parameters():
                # std 0.02 as in training init; norms at 1: the activations stay in a realistic range
                p.fill_(1.0) if p.ndim == 1 else p.normal_(0, 0.02)
        model.save_pretrained(hf, safe_serialization=True)
        _tokenizer(hf)
    for quant in ("q4_0", "q8_0"):
        target = out / f"tiny1b.{quant.upper()}.gguf"
        if not target.exists():
            subprocess.run([sys.executable, "-m", "camelid.cli", "convert", str(hf), str(target), "--to", "gguf",
                            "--quant", quant], check=True)
        print(target, f"{target.stat().st_size / 1e6:.0f} MB")


def _tokenizer(folder: Path) -> None:
    """The LLaMA-2 tokenizer `make setup` builds (32000 pieces, as TinyLlama's), so the files carry a vocabulary."""
    import shutil
    src = Path(__file__).resolve().parent.parent / ".cache" / "tokenizer-llama2"
    if not src.is_dir():
        sys.exit(f"{src} is missing: run `make setup` first (it builds LLaMA-2's tokenizer)")
    for f in src.iterdir():
        shutil.copy(f, folder / f.name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
