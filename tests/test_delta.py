"""`camelid diff` and `camelid delta`: camelid's exact diff (bit for bit, verified by sha256), the Koala path
(Meta shards -> EasyLM, an EasyLM bf16 diff, recovery, HF logits), the Vicuna v0 path (a FastChat delta
with 32001 rows), and outputs that never stay half-written."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from camelid.cli import main
from camelid.config import ModelConfig
from camelid.convert import convert, expected_shapes
from camelid import delta
from camelid.delta import make_diff, recover
from camelid.formats import open_reader

from .builders import logits, tiny_hf, write_meta_shards
from .helpers import interrupt_midway, one_line_error, run_camelid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_weights(config: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=g) * 0.02
        out[name] = (1 + 5 * t if "norm" in name else t).to(dtype)
    return out


def fine_tune(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """What a fine-tune does to the weights: small moves, computed in float32 and stored in the same dtype."""
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + 1e-3 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in weights.items()}


def write_hf(folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    if tokenizer is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / f, folder / f)
    return folder


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def cli(camelid_bin: Path, *args) -> subprocess.CompletedProcess:
    """The real `camelid` command in its own process."""
    return run_camelid(camelid_bin, *args, "--quiet", timeout=120)


@pytest.fixture
def camelid(capsys):
    """`camelid ARGS` through the same entry point, in this process (no interpreter start-up per call)."""
    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main([*map(str, args), "--quiet"])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return run


CONFIG = ModelConfig.from_name("llama-2-70b").tiny(num_kv_heads=2)  # GQA, so k's permutation uses the kv heads


# ---- camelid's exact diff -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_camelid_diff_recovers_the_target_bit_for_bit(tmp_path: Path, dtype: str, llama2_tokenizer_dir: Path) -> None:
    base = random_weights(CONFIG, 0, DTYPES[dtype])
    target = fine_tune(base, 1)
    q = target["model.layers.1.self_attn.q_proj.weight"]  # values float arithmetic would not carry through
    q[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")], dtype=q.dtype)
    write_hf(tmp_path / "base", CONFIG, base)
    write_hf(tmp_path / "target", CONFIG, target, tokenizer=llama2_tokenizer_dir)
    result = make_diff(str(tmp_path / "base"), str(tmp_path / "target"), tmp_path / "diff", progress=False)
    described = json.loads((tmp_path / "diff" / "camelid.json").read_text())
    assert described["kind"] == "camelid-diff" and len(described["sha256"]) == len(target) == result.tensors
    # The base may come in another format: Meta shards with interleaved q/k rows.
    convert(str(tmp_path / "base"), tmp_path / "base-meta", "meta", shards=2, progress=False)
    recover(str(tmp_path / "base-meta"), str(tmp_path / "diff"), tmp_path / "out", progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == target.keys()
    for name, t in target.items():
        assert same_bits(got[name], t), name
    # The output describes itself with the target's digests; config and tokenizer came with the diff.
    assert json.loads((tmp_path / "out" / "camelid.json").read_text())["sha256"] == described["sha256"]
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 2


@pytest.fixture(scope="module")
def diff_setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diff")
    base = random_weights(CONFIG, 0, torch.bfloat16)
    write_hf(root / "base", CONFIG, base)
    write_hf(root / "target", CONFIG, fine_tune(base, 1))
    other = dict(base)
    other["model.layers.1.mlp.up_proj.weight"] = fine_tune(base, 2)["model.layers.1.mlp.up_proj.weight"]
    write_hf(root / "other-base", CONFIG, other)
    make_diff(str(root / "base"), str(root / "target"), root / "diff", progress=False)
    return root


def test_wrong_base_names_the_tensor_and_leaves_nothing(camelid_bin: Path, diff_setup: Path, tmp_path: Path) -> None:
    proc = cli(camelid_bin, "diff", "recover", diff_setup / "other-base", diff_setup / "diff", tmp_path / "out")
    one_line_error(proc, "model.layers.1.mlp.up_proj.weight", "wrong base")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_corrupt_diff_is_caught(camelid, diff_setup: Path, tmp_path: Path) -> None:
    diff = tmp_path / "diff"
    shutil.copytree(diff_setup / "diff", diff)
    weights = diff / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # one bit of the last tensor's data
    weights.write_bytes(bytes(data))
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # which tensor that bit belongs to
    hit = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    proc = camelid("diff", "recover", diff_setup / "base", diff, tmp_path / "out")
    one_line_error(proc, hit, "corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff"]


def test_mismatched_checkpoints_give_one_line(camelid, diff_setup: Path, tmp_path: Path) -> None:
    wider = CONFIG.tiny(num_kv_heads=2, intermediate_size=192)
    write_hf(tmp_path / "wider", wider, random_weights(wider, 0, torch.bfloat16))
    proc = camelid("diff", "recover", tmp_path / "wider", diff_setup / "diff", tmp_path / "out")
    one_line_error(proc, "mlp.", "(64, 176)", "(64, 192)")
    partial = dict(load_file(diff_setup / "target" / "model.safetensors"))
    del partial["model.layers.0.mlp.down_proj.weight"]
    (tmp_path / "partial").mkdir()
    save_file(partial, tmp_path / "partial" / "model.safetensors")
    shutil.copyfile(diff_setup / "target" / "config.json", tmp_path / "partial" / "config.json")
    proc = camelid("diff", "make", diff_setup / "base", tmp_path / "partial", tmp_path / "out")
    one_line_error(proc, "model.layers.0.mlp.down_proj.weight")
    proc = camelid("diff", "make", diff_setup / "base", diff_setup / "target", diff_setup / "diff")
    one_line_error(proc, "already exists", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial", "wider"]


# ---- Koala: Meta shards -> EasyLM, an EasyLM (bf16) diff, recovery, HF -----------------------------------------
def test_koala_path(camelid, tmp_path: Path, monkeypatch) -> None:
    base_model = tiny_hf(2)
    target_model = tiny_hf(2, seed=1)
    with torch.no_grad():  # the target is a fine-tune of the base
        for (_, p), (_, q) in zip(base_model.named_parameters(), target_model.named_parameters()):
            q.copy_(p + 0.01 * q)
    write_meta_shards(base_model, tmp_path / "llama", shards=2)
    convert(str(tmp_path / "llama"), tmp_path / "llama.easylm", "easylm", progress=False)
    target_model.save_pretrained(tmp_path / "koala-hf")
    base_spec = f"params::{tmp_path / 'llama.easylm'}"
    cfg = tmp_path / "llama" / "params.json"

    # EasyLM's diff_checkpoint: target - base, saved with float_dtype bf16.
    proc = camelid("diff", "make", base_spec, tmp_path / "koala-hf", tmp_path / "koala_diff.easylm",
               "--format", "easylm", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    diff = open_reader(f"params::{tmp_path / 'koala_diff.easylm'}")
    base_sd, target_sd = base_model.state_dict(), target_model.state_dict()
    assert diff.tensors()["transformer/h/0/attention/wo/kernel"].dtype == "BF16"
    # kernels are in x out in EasyLM: the diff of o_proj is the transposed difference
    want = (target_sd["model.layers.0.self_attn.o_proj.weight"] - base_sd["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(diff.read("transformer/h/0/attention/wo/kernel"), want.T.to(torch.bfloat16))
    assert torch.equal(diff.read("transformer/wte/embedding"),
                       (target_sd["model.embed_tokens.weight"] - base_sd["model.embed_tokens.weight"]).to(torch.bfloat16))

    # Recovery as Koala's instructions do it (EasyLM base + EasyLM diff -> EasyLM), then to HF.
    proc = camelid("diff", "recover", base_spec, f"params::{tmp_path / 'koala_diff.easylm'}",
               tmp_path / "koala.easylm", "--format", "easylm", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    convert(f"params::{tmp_path / 'koala.easylm'}", tmp_path / "koala", "hf", config=str(cfg), progress=False)
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "koala").eval()
    want_logits = logits(target_model)
    got = logits(recovered)
    assert not torch.equal(got, want_logits)  # bf16 storage: close, not exact
    torch.testing.assert_close(got, want_logits, atol=0.02 * want_logits.abs().max().item(), rtol=0)
    # The base straight from the Meta shards gives the same recovery, also when the float32 arithmetic runs
    # in slices of rows (as it does for tensors of over 4M elements).
    monkeypatch.setattr(delta, "_SLICE", 1000)
    recover(str(tmp_path / "llama"), f"params::{tmp_path / 'koala_diff.easylm'}", tmp_path / "koala2", progress=False)
    again = load_file(tmp_path / "koala2" / "model.safetensors")
    for name, t in load_file(tmp_path / "koala" / "model.safetensors").items():
        assert torch.equal(again[name], t), name

    # camelid's own diff of the same pair gives exactly the target's logits.
    proc = camelid("diff", "make", base_spec, tmp_path / "koala-hf", tmp_path / "exact", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    proc = camelid("diff", "recover", base_spec, tmp_path / "exact", tmp_path / "exact-hf")
    assert proc.returncode == 0, proc.stderr
    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "exact-hf").eval()
    assert torch.equal(logits(exact), want_logits)


# ---- Vicuna v0: an HF delta with one more vocabulary row (FastChat's arithmetic) ----------------------------------
def test_vicuna_v0_delta(camelid, tmp_path: Path, llama2_tokenizer_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(delta, "_SLICE", 1000)  # float16 arithmetic in slices of rows must change no bit
    llama = CONFIG.tiny(num_kv_heads=2, vocab_size=32000)
    vicuna = CONFIG.tiny(num_kv_heads=2, vocab_size=32001)
    base = random_weights(llama, 0, torch.float16)
    grown = {n: torch.cat([t, torch.zeros(1, t.shape[1], dtype=t.dtype)]) if t.shape[0] == 32000 else t
             for n, t in base.items()}
    target = fine_tune(grown, 3)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the new [PAD] row, trained from scratch
        target[name][-1] = torch.randn(target[name].shape[1]).to(torch.float16)
    write_hf(tmp_path / "llama", llama, base, tokenizer=llama2_tokenizer_dir)
    write_hf(tmp_path / "vicuna", vicuna, target, tokenizer=llama2_tokenizer_dir)
    # The delta as FastChat v0 made it: base resized with zero rows, delta = target - base in fp16,
    # saved with save_pretrained as pytorch_model.bin next to the target's config and tokenizer.
    fastchat_delta = {n: target[n] - grown[n] for n in target}
    (tmp_path / "delta").mkdir()
    torch.save(fastchat_delta, tmp_path / "delta" / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tmp_path / "vicuna" / f, tmp_path / "delta" / f)

    proc = camelid("delta", "apply", tmp_path / "llama", tmp_path / "delta", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "notice: model.embed_tokens.weight has 32001 rows in the delta but 32000 in the base" in proc.stderr
    assert "notice: lm_head.weight has 32001 rows" in proc.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in base.items():  # FastChat's apply_delta: param.data += delta (fp16), after the zero rows
        want = grown[name].clone()
        want += fastchat_delta[name]
        assert same_bits(got[name], want), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 32001
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "delta" / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.get_input_embeddings().weight.shape == (32001, 64)

    # make_delta gives back FastChat's delta, bit for bit, with the same notice.
    proc = camelid("delta", "make", tmp_path / "llama", tmp_path / "vicuna", tmp_path / "delta2")
    assert proc.returncode == 0 and "notice: model.embed_tokens.weight" in proc.stderr, proc.stderr
    made = load_file(tmp_path / "delta2" / "model.safetensors")
    for name, t in fastchat_delta.items():
        assert same_bits(made[name], t), name


def test_delta_takes_paths_as_diff_does_and_the_old_flags_still_work(camelid, diff_setup: Path,
                                                                     tmp_path: Path) -> None:
    """`delta make|apply BASE X OUT` in order, as `diff`; `--base/--target|--delta/--out` (the old spelling)
    gives the same bytes with one notice line."""
    base, target = diff_setup / "base", diff_setup / "target"
    new = camelid("delta", "make", base, target, tmp_path / "new")
    assert new.returncode == 0 and new.stderr == "", new.stderr
    old = camelid("delta", "make", "--base", base, "--target", target, "--out", tmp_path / "old")
    assert old.returncode == 0, old.stderr
    assert old.stderr.splitlines() == ["camelid: notice: --base/--target/--out is the old spelling; give the paths "
                                       "in order: camelid delta make BASE TARGET OUT"]
    assert (tmp_path / "new" / "model.safetensors").read_bytes() == (tmp_path / "old" / "model.safetensors").read_bytes()
    applied = camelid("delta", "apply", "--base", base, "--delta", tmp_path / "new", "--out", tmp_path / "back")
    assert applied.returncode == 0 and "camelid delta apply BASE DELTA OUT" in applied.stderr, applied.stderr
    assert len(applied.stderr.splitlines()) == 1
    assert camelid("delta", "apply", base, tmp_path / "new", tmp_path / "back2").returncode == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == \
        (tmp_path / "back2" / "model.safetensors").read_bytes()
    # Both spellings at once, or a path missing: one line, exit 2, nothing written.
    one_line_error(camelid("delta", "make", base, "--target", target, "--out", tmp_path / "x"), "not both")
    one_line_error(camelid("delta", "apply", base, tmp_path / "new"), "missing OUT", "BASE DELTA OUT")
    assert not (tmp_path / "x").exists()


# ---- interrupted recovery ---------------------------------------------------------------------------------------
def test_sigterm_midway_leaves_no_output(camelid_bin: Path, tmp_path: Path) -> None:
    big = ModelConfig.from_name("llama-7b").tiny(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                                 num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64)
    base = random_weights(big, 0, torch.bfloat16)
    write_hf(tmp_path / "base", big, base)
    write_hf(tmp_path / "target", big, fine_tune(base, 1))
    del base
    make_diff(str(tmp_path / "base"), str(tmp_path / "target"), tmp_path / "diff", progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen([str(camelid_bin), "diff", "recover", str(tmp_path / "base"), str(tmp_path / "diff"),
                             str(tmp_path / "out"), "--format", "meta", "--quiet"], stderr=subprocess.PIPE, text=True)
    interrupt_midway(proc, tmp_path, ".out.tmp-*/consolidated.00.pth", "recovery")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_diff_folder_is_not_loaded_as_a_model(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    from camelid.engine import load_model
    from camelid.errors import CamelidError
    base, target = random_weights(CONFIG, 0, torch.float32), random_weights(CONFIG, 1, torch.float32)
    write_hf(tmp_path / "base", CONFIG, base, tokenizer=llama2_tokenizer_dir)
    write_hf(tmp_path / "target", CONFIG, target, tokenizer=llama2_tokenizer_dir)
    assert main(["diff", "make", str(tmp_path / "base"), str(tmp_path / "target"), str(tmp_path / "diff")]) == 0
    with pytest.raises(CamelidError, match="diff recover"):
        load_model(tmp_path / "diff")


# ---- the wrong kind of artifact, and weights that are not numbers ------------------------------------------------
def test_delta_apply_refuses_a_camelid_diff_by_its_camelid_json(camelid_bin: Path, diff_setup: Path,
                                                                tmp_path: Path) -> None:
    proc = cli(camelid_bin, "delta", "apply", diff_setup / "base", diff_setup / "diff", tmp_path / "out")
    one_line_error(proc, "camelid-diff", "camelid diff recover")
    assert not (tmp_path / "out").exists()
    delta.make_delta(str(diff_setup / "base"), str(diff_setup / "target"), tmp_path / "delta", progress=False)
    proc = cli(camelid_bin, "diff", "recover", diff_setup / "base", tmp_path / "delta", tmp_path / "out")
    one_line_error(proc, "fastchat-delta", "camelid delta apply")
    proc = cli(camelid_bin, "delta", "apply", diff_setup / "diff", tmp_path / "delta", tmp_path / "out")
    one_line_error(proc, "base model")
    assert not (tmp_path / "out").exists()


def test_float16_overflow_is_refused_not_written(camelid, tmp_path: Path) -> None:
    base = random_weights(CONFIG, 0, torch.float32)
    up = "model.layers.1.mlp.up_proj.weight"
    base[up][0, 0] = 60000.0
    write_hf(tmp_path / "base", CONFIG, base)
    # a FastChat delta (no camelid.json) whose sum with the base overflows float16, FastChat's arithmetic
    fastchat = {n: torch.zeros_like(t, dtype=torch.float16) for n, t in base.items()}
    fastchat[up][0, 0] = 10000.0
    write_hf(tmp_path / "delta", CONFIG, fastchat)
    proc = camelid("delta", "apply", tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    one_line_error(proc, up, "non-finite")
    assert not (tmp_path / "out").exists()
    big = dict(base)
    big[up] = base[up].clone()
    big[up][0, 0] = 1e6  # a float32 weight float16 cannot hold
    write_hf(tmp_path / "big", CONFIG, big)
    proc = camelid("convert", tmp_path / "big", tmp_path / "big16", "--to", "hf", "--dtype", "float16")
    one_line_error(proc, up, "non-finite", "--dtype bfloat16")
    assert not (tmp_path / "big16").exists() and not list(tmp_path.glob(".big16*"))
    proc = camelid("convert", tmp_path / "big", tmp_path / "big-meta", "--to", "meta", "--dtype", "float16")
    one_line_error(proc, up, "non-finite")
    proc = camelid("convert", tmp_path / "big", tmp_path / "bigbf", "--to", "hf", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
