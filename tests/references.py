"""The reference cases the tests and the correctness tools (bench/correctness/) share:
the tiny parity model trained through `python -m launch train` and the same steps in
PyTorch (AdamW + clip_grad_norm_), one step's gradients against autograd, and LoRA's
case against transformers + peft.  Both import this module; neither imports the other."""
import os

import numpy as np
import torch
from safetensors.numpy import load_file

from conftest import TINY, launch, read_metrics, write_tiny_inputs
from peft_reference import adapter_state, hf_model, loss_of, peft_model
from torch_gpt2 import TorchGPT2, random_state
from trainer.gemm import Engine
from trainer.model import Layers
from trainer.models import param_layout
from trainer.models.gpt2 import GPTConfig, Model as GPT
from trainer.trainable import Full, Weights

B, T, STEPS, LR, WD, CLIP = 4, 32, 8, 1e-3, 0.1, 1.0
# 5 whole windows and a few tokens more: steps 6-8 wrap to the start of the file
N_TOKENS = 5 * B * T + 7
# GPT-2's own context scaled down: T=512 is 4 x 4 attention blocks of the default 128
LONG_B, LONG_T = 2, 512


def torch_reference(state, tokens, bf16=False, B=B, T=T):
    """The batch order of DESIGN.md, written out sequentially; AdamW and
    clipping straight from torch; bf16: under torch.autocast's bf16 on CPU.
    -> (losses, final weights, exact gradient norm of every step)"""
    model = TorchGPT2(state, TINY["n_layer"], TINY["n_head"])
    opt = model.optimizer(LR, WD)
    losses, norms, pos = [], [], 0
    for _ in range(STEPS):
        window = torch.from_numpy(tokens[pos:pos + B * T + 1].astype(np.int64))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(window[:-1].view(B, T), window[1:].view(B, T))
        loss.backward()
        norms.append(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()) ** 0.5)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
        pos += B * T
        if pos + B * T + 1 > len(tokens):
            pos = 0
    return losses, model.state(), norms


def train_tiny(root, workers, name, *extra, env=None, B=B, T=T):
    """-> (losses, final weights, metrics rows, stderr), the windows in file order as the
    PyTorch reference reads them (--data-order sequential)."""
    out = root / name
    done = launch("train", "--init-from", root / "init", "--data", root / "tokens.bin", "--data-order", "sequential",
                  "--batch-size", B, "--seq-len", T, "--steps", STEPS, "--lr", LR,
                  "--lr-schedule", "constant", "--warmup", 0, "--weight-decay", WD,
                  "--grad-clip", CLIP, "--workers", workers, "--threads-per-worker", 1,
                  "--eval-every", 0, "--out-dir", out, *extra, env=env)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(out)
    losses = [row["loss"] for row in rows if "loss" in row]
    weights = load_file(os.path.join(out, "checkpoints", f"step_{STEPS:06d}", "model.safetensors"))
    return losses, weights, rows, done.stderr


STRATEGIES = ["hybrid", "data"]
RUNS = [(p, w, False) for p in STRATEGIES for w in (1, 2, 4)] + [(p, w, True) for p in STRATEGIES for w in (1, 2)]
# attention blocks of 8 positions: T=32 spans 4 query x 4 key blocks, 6 of them skipped;
# the lm head 40 rows at a time: 4 chunks of B·T = 128 rows, the last of 8
SMALL_CHUNKS = {"COREGPT_ATTENTION_BLOCK": "8", "COREGPT_HEAD_ROWS": "40"}



# LoRA: an adapter peft wrote, trained by both
RANK, ALPHA = 4, 8.0  # alpha / r = 2: the scale is not 1
ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_hf(state):
    return hf_model(state, TINY["n_layer"], TINY["n_head"], TINY["n_embd"], TINY["n_ctx"], TINY["vocab"])


def windows(tokens):
    """The batch order of DESIGN.md: consecutive windows, wrapping to the start."""
    pos = 0
    for _ in range(STEPS):
        window = torch.from_numpy(tokens[pos:pos + B * T + 1].astype(np.int64))
        yield window[:-1].view(B, T), window[1:].view(B, T)
        pos += B * T
        if pos + B * T + 1 > len(tokens):
            pos = 0


def peft_reference(state, tokens, adapters):
    """8 steps of peft's LoRA with torch's AdamW (decay on the 2-D adapters, as on every
    2-D parameter that trains) and clip_grad_norm_ -> (losses, adapters, exact norms)."""
    model = peft_model(tiny_hf(state), RANK, ALPHA, ALL, adapters)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    losses, norms = [], []
    for idx, targets in windows(tokens):
        opt.zero_grad()
        loss = loss_of(model, idx, targets)
        loss.backward()
        norms.append(sum(float((p.grad.double() ** 2).sum()) for p in trained) ** 0.5)
        torch.nn.utils.clip_grad_norm_(trained, CLIP)
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.numpy() for k, v in adapter_state(model).items()}, norms


def make_case(root):
    """root/init (the base), tokens.bin, adapter/ (peft's own files: A from peft's init,
    B random) -> (root, base state, tokens, adapters, peft's trainable count, peft_reference)."""
    state, tokens = write_tiny_inputs(root, seed=0, n_tokens=N_TOKENS)
    torch.manual_seed(0)
    model = peft_model(tiny_hf(state), RANK, ALPHA, ALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.peft_config["default"].base_model_name_or_path = str(root / "init")
    model.save_pretrained(root / "adapter")
    adapters = {k: v.numpy() for k, v in adapter_state(model).items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return root, state, tokens, adapters, trainable, peft_reference(state, tokens, adapters)


def train_adapter(root, name, *extra, workers=1, env=None, steps=STEPS):
    out = root / name
    done = launch("train", "--init-from", root / "adapter", "--data", root / "tokens.bin", "--data-order",
                  "sequential", "--batch-size", B, "--seq-len", T, "--steps", steps, "--lr", LR, "--lr-schedule", "constant", "--warmup", 0,
                  "--weight-decay", WD, "--grad-clip", CLIP, "--workers", workers, "--threads-per-worker", 1,
                  "--eval-every", 0, "--out-dir", out, *extra, env=env)
    assert done.returncode == 0, done.stderr
    return out, done.stderr


def final(out, steps=STEPS):
    ckpt = os.path.join(out, "checkpoints", f"step_{steps:06d}")
    prefix = "base_model.model.transformer."
    return {k[len(prefix):-len(".weight")]: v for k, v in load_file(os.path.join(ckpt, "adapter_model.safetensors")).items()}


LORA_RUNS = [(p, w) for p in ("hybrid", "data") for w in (1, 2)]



# one step's gradients against autograd
def compare_gradients(n_layer, n_head, n_embd, n_ctx, B, T, seed=0):
    """-> (loss ours, loss torch, {name: max|Δg| / max|g_torch|})"""
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=n_ctx)
    state = random_state(n_layer, n_embd, cfg.vocab_size, n_ctx, seed)
    layout = param_layout(cfg)
    _, params = layout.allocate()
    _, grads = layout.allocate()
    for name, value in state.items():
        params[name][...] = value.numpy()
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, B * T + 1)
    model = GPT(cfg, B, T, Weights(params, Full(cfg)), grads, layers=Layers(Engine("numpy")))
    model.load_batch(tokens)
    loss = model.forward(1.0 / (B * T)) / (B * T)
    model.backward()
    reference = TorchGPT2(state, n_layer, n_head)
    t = torch.from_numpy(tokens)
    torch_loss = reference(t[:-1].view(B, T), t[1:].view(B, T))
    torch_loss.backward()
    rel = {name: float(np.abs(grads[name] - g).max() / np.abs(g).max())
           for name, g in reference.grads().items()}
    return loss, torch_loss.item(), rel
