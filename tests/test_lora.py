"""LoRA against Hugging Face transformers + peft (the independent reference): the
model's gradients, 8 training steps, the files peft loads, merging, resume and
bad input.  The parity runs start from an adapter peft wrote (A random, B made
non-zero so that every gradient path is live) through --init-from.  (Made to fail
on purpose once each: u scaled by 1.001 s fails the gradient test; dropout masks
keyed by a worker's own row instead of the batch's fails the split test.)"""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import TINY, launch, read_metrics
from peft_reference import loss_of, peft_model
from references import (ALL, ALPHA, B, CLIP, LORA_RUNS as RUNS, LR, RANK, SMALL_CHUNKS, STEPS, T, WD, final,
                        make_case, tiny_hf, train_adapter as train, windows)

pytestmark = pytest.mark.e2e  # each test runs python -m launch


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("lora"))


def test_model_gradients_match_peft(case):
    """One forward and backward in process: the loss and every adapter gradient."""
    from trainer.lora import Lora
    _, state, tokens, adapters, _, _ = case
    loss, grads = one_step(case, Lora(RANK, ALPHA, ALL))
    reference = peft_model(tiny_hf(state), RANK, ALPHA, ALL, adapters)
    idx, targets = next(windows(tokens))
    expected = loss_of(reference, idx, targets)
    expected.backward()
    assert abs(loss - expected.item()) < 1e-5
    got = {k: p.grad.numpy() for k, p in adapter_state_params(reference).items()}
    assert set(got) == set(grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, got[name], rtol=0, atol=1e-6, err_msg=name)


def one_step(case, lora, dropout_key=None):
    """coregpt's model alone, in process, on the case's base, adapters and first window:
    -> (mean loss, {adapter: gradient}).  dropout_key: (micro-batch, first token row)."""
    from trainer.gemm import Engine
    from trainer.model import Layers
    from trainer.models.gpt2 import Model as GPT
    from trainer.lora import adapter_layout
    from trainer.models import param_layout
    from trainer.models.gpt2 import GPTConfig
    _, state, tokens, adapters, _, _ = case
    cfg = GPTConfig(TINY["n_layer"], TINY["n_head"], TINY["n_embd"], TINY["n_ctx"], TINY["vocab"])
    params = param_layout(cfg).allocate()[1]
    for name, view in params.items():
        view[...] = state[name].numpy()
    mine, grads = adapter_layout(cfg, lora).allocate()[1], adapter_layout(cfg, lora).allocate()[1]
    for name, view in mine.items():
        view[...] = adapters[name]
    from trainer.lora_training import LoraTraining
    from trainer.trainable import Weights
    weights = Weights(params, trains=LoraTraining(cfg, lora), trained=mine)
    model = GPT(cfg, B, T, weights, grads, layers=Layers(Engine("numpy")))
    model.load_batch(tokens, dropout_key or (0, 0))
    loss = model.forward(1.0 / (B * T)) / (B * T)
    model.backward()
    return loss, grads


def adapter_state_params(model):
    prefix = "base_model.model.transformer."
    return {n[len(prefix):-len(".default.weight")]: p for n, p in model.named_parameters() if "lora_" in n}




@pytest.fixture(scope="module")
def runs(case):
    root = case[0]
    return {(p, w): train(root, f"{p}{w}", "--parallel", p, workers=w, env=SMALL_CHUNKS) for p, w in RUNS}


@pytest.mark.parametrize("parallel, workers", RUNS)
def test_training_matches_peft(case, runs, parallel, workers):
    """Every loss and adapter weight within 1e-4, every grad norm within 2e-5."""
    root, _, _, _, trainable, (losses, adapters, norms) = case
    out, stderr = runs[parallel, workers]
    rows = [row for row in read_metrics(out) if "loss" in row]
    np.testing.assert_allclose([row["loss"] for row in rows], losses, rtol=0, atol=1e-4)
    np.testing.assert_allclose([row["grad_norm"] for row in rows], norms, rtol=2e-5, atol=0)
    got = final(out)
    assert set(got) == set(adapters)
    for name, value in adapters.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-4, err_msg=name)
    assert f"trainable params: {trainable:,} ||" in stderr  # peft's own count


def test_header_counts_as_peft_prints():
    """GPT-2 124M with r=8 on c_attn: peft's print_trainable_parameters line."""
    from trainer.lora import parameter_counts
    from trainer.lora import Lora
    from trainer.models.gpt2 import PRESETS, GPTConfig
    line = parameter_counts(GPTConfig(**PRESETS["gpt2"]), Lora(8, 8.0, ("attn.c_attn",)))
    assert line == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"


def test_peft_loads_the_export(case, runs, tmp_path):
    """PeftModel.from_pretrained(base, export) has every key and coregpt's logits; the
    merged hf export equals peft's merge_and_unload()."""
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file as load_torch
    from trainer.base import load_model
    from trainer.sample import Sampler
    root, state = case[:2]
    out = runs["hybrid", 2][0]
    export = tmp_path / "peft"
    done = launch("export", "--checkpoint", out, "--format", "peft", "--out", export)
    assert done.returncode == 0, done.stderr
    model = PeftModel.from_pretrained(tiny_hf(state), str(export))
    loaded = set_peft_model_state_dict(model, load_torch(str(export / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    tokens = list(range(100, 120))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy()
    cfg, merged = load_model(str(out))
    np.testing.assert_allclose(Sampler(cfg, merged).forward(tokens, 0), expected, rtol=0, atol=1e-4)
    hf = tmp_path / "merged"
    done = launch("export", "--checkpoint", out, "--format", "hf", "--out", hf)
    assert done.returncode == 0, done.stderr
    exported = load_file(str(hf / "model.safetensors"))
    reference = model.merge_and_unload().transformer.state_dict()
    for name, value in exported.items():
        np.testing.assert_allclose(value, reference[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_resume_is_bit_exact(case):
    """3 steps, then --resume to 6 (bf16, 8-bit Adam, recompute, 2 hybrid workers):
    the adapters and their optimizer state equal a 6-step run's to the bit."""
    root = case[0]
    extra = ("--precision", "bf16", "--optim", "adamw8bit", "--recompute", "--workers", 2)
    whole, _ = train(root, "whole", *extra[:-2], workers=2, steps=6)
    part, _ = train(root, "part", *extra[:-2], workers=2, steps=3)
    done = launch("train", "--resume", "--out-dir", part, "--steps", 6)
    assert done.returncode == 0, done.stderr
    for file in ("adapter_model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(run, "checkpoints", "step_000006", file)) for run in (whole, part))
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), file
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (whole, part)]
    assert losses[0] == losses[1]
    # and the base is named, not copied
    with open(os.path.join(part, "checkpoints", "step_000006", "state.json")) as f:
        base = json.load(f)["base"]
    assert base["path"].endswith("model.safetensors") and len(base["sha256"]) == 64
    assert not os.path.exists(os.path.join(part, "checkpoints", "step_000006", "model.safetensors"))


def copy_adapter(root, directory, base):
    """The case's peft adapter copied to directory/adapter, naming `base` as its base."""
    import shutil
    shutil.copytree(root / "adapter", directory / "adapter")
    with open(directory / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    config["base_model_name_or_path"] = str(base)
    with open(directory / "adapter" / "adapter_config.json", "w") as f:
        json.dump(config, f)


def test_resume_refuses_a_changed_base(case, tmp_path):
    import shutil
    root = case[0]
    shutil.copytree(root / "init", tmp_path / "init")
    shutil.copy(root / "tokens.bin", tmp_path / "tokens.bin")
    copy_adapter(root, tmp_path, tmp_path / "init")
    out, _ = train(tmp_path, "run", steps=2)
    with open(tmp_path / "init" / "model.safetensors", "r+b") as f:  # one byte of the last tensor
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    done = launch("train", "--resume", "--out-dir", out, "--steps", 4)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "base weights changed" in done.stderr


def test_init_from_seed_is_peft_init(tmp_path):
    """No --init-from: GPT-2's initialisation as the base, A ~ U(±1/sqrt(in)), B = 0,
    the same for the same seed; sampling merges the adapter."""
    from conftest import write_token_file
    write_token_file(tmp_path / "tokens.bin", np.random.default_rng(0).integers(0, TINY["vocab"], 2000))
    outs = []
    for name in ("a", "b"):
        done = launch("train", "--n-layer", 2, "--n-embd", 64, "--n-head", 4, "--block-size", 64, "--data",
                      tmp_path / "tokens.bin", "--batch-size", 2, "--seq-len", 16, "--steps", 0, "--eval-every", 0,
                      "--lora-rank", 4, "--out-dir", tmp_path / name)
        assert done.returncode == 0, done.stderr
        outs.append(tmp_path / name)
    done = launch("train", "--n-layer", 2, "--n-embd", 64, "--n-head", 4, "--block-size", 64, "--data",
                  tmp_path / "tokens.bin", "--batch-size", 2, "--seq-len", 16, "--steps", 1, "--lr", 0,
                  "--eval-every", 0, "--lora-rank", 4, "--out-dir", tmp_path / "one")
    assert done.returncode == 0, done.stderr
    adapters = final(tmp_path / "one", 1)
    for name, value in adapters.items():
        if name.endswith("lora_A"):
            assert value.shape == (4, 64) and np.abs(value).max() <= 1 / 8 and np.abs(value).max() > 0.1
        else:
            assert value.shape == (192, 4) and not value.any()
    sample = launch("sample", "--checkpoint", tmp_path / "one", "--max-new-tokens", 3)
    assert sample.returncode == 0, sample.stderr
    # a LoRA run given to --init-from: its adapter on its (seeded) base, continued
    done = launch("train", "--init-from", tmp_path / "one", "--data", tmp_path / "tokens.bin", "--batch-size", 2,
                  "--seq-len", 16, "--steps", 1, "--lr", 0, "--eval-every", 0, "--out-dir", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    assert "LoRA r=4" in done.stderr
    again = final(tmp_path / "two", 1)
    assert all(np.array_equal(again[k], v) for k, v in adapters.items())


@pytest.mark.parametrize("flags, message", [
    (["--lora-targets", "c_attn"], "--lora-rank must be a positive integer for --lora-targets"),
    (["--lora-rank", "-1"], "--lora-rank must not be negative"),
    (["--lora-rank", "4", "--lora-targets", "c_attn,lm_head"], "unknown target 'lm_head'"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
])
def test_bad_lora_settings(tmp_path, flags, message):
    done = launch("train", "--steps", 1, "--out-dir", tmp_path / "run", *flags)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "run")


def test_adapter_of_another_base(case, tmp_path):
    """A peft adapter whose base has other shapes (128 channels, not 64): one line, exit 2."""
    from conftest import write_hf_dir
    from torch_gpt2 import random_state
    root = case[0]
    write_hf_dir(tmp_path / "wide", random_state(2, 128, TINY["vocab"], TINY["n_ctx"], 3), 2, 4, 128,
                 TINY["n_ctx"], TINY["vocab"])
    copy_adapter(root, tmp_path, tmp_path / "wide")
    done = launch("train", "--init-from", tmp_path / "adapter", "--data", root / "tokens.bin", "--steps", 1,
                  "--batch-size", 2, "--seq-len", 16, "--out-dir", tmp_path / "run")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "expected (4, 128) for this base model" in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "run")


def test_dropout_gradients_match_peft_with_the_same_masks(case):
    """--lora-dropout: coregpt's masks put into peft's lora_dropout modules give the
    same loss and adapter gradients (through the dropped input, both ways)."""
    from trainer.lora import Lora, dropout_mask
    from trainer.models.gpt2 import LORA_TARGETS as TARGETS, lora_fans as fans
    from trainer.models.gpt2 import GPTConfig
    _, state, tokens, adapters, _, _ = case
    cfg = GPTConfig(TINY["n_layer"], TINY["n_head"], TINY["n_embd"], TINY["n_ctx"], TINY["vocab"])
    loss, grads = one_step(case, Lora(RANK, ALPHA, ALL, dropout=0.3, seed=5), dropout_key=(3, 0))

    class Mask(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.mask = torch.from_numpy(mask).view(B, T, -1)

        def forward(self, x):
            return x * self.mask

    reference = peft_model(tiny_hf(state), RANK, ALPHA, ALL, adapters)
    blocks = reference.base_model.model.transformer.h
    for l in range(cfg.n_layer):
        for target in ALL:
            mask = np.empty((B * T, fans(cfg, target)[0]), dtype=np.float32)
            dropout_mask(mask, 0.3, (5, 3, l, TARGETS.index(target)), 0)
            assert 0.6 < (mask > 0).mean() < 0.8 and set(np.unique(mask)) == {0, np.float32(1 / 0.7)}
            module = blocks[l].get_submodule(target)
            module.lora_dropout["default"] = Mask(mask)
    idx, targets = next(windows(tokens))
    expected = loss_of(reference, idx, targets)
    expected.backward()
    assert abs(loss - expected.item()) < 1e-5
    got = {k: p.grad.numpy() for k, p in adapter_state_params(reference).items()}
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, got[name], rtol=0, atol=1e-6, err_msg=name)


def test_dropout_masks_do_not_depend_on_the_split(case):
    """The same masks whichever worker draws a row: 1 hybrid worker and 2 data-parallel
    workers train to the same losses (within the order-of-sums 1e-5)."""
    root = case[0]
    one, _ = train(root, "drop-h1", "--lora-dropout", 0.2, "--lora-rank", RANK, steps=3)
    two, _ = train(root, "drop-d2", "--lora-dropout", 0.2, "--lora-rank", RANK, "--parallel", "data", workers=2,
                   steps=3)
    plain, _ = train(root, "drop-0", steps=3)
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (one, two, plain)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-5)
    assert abs(losses[0][0] - losses[2][0]) > 1e-4  # the dropout is there


@pytest.mark.system  # an MPI job
def test_mpi_two_ranks_match_peft(case):
    """LoRA under `mpiexec -n 2 --backend mpi` (the adapters' gradients all-reduced):
    peft's losses and adapters, and bit-identical adapters on both ranks."""
    from test_mpi import mpi_launch
    root, _, _, _, _, (losses, adapters, _) = case
    out = root / "mpi2"
    done = mpi_launch(2, "train", "--init-from", root / "adapter", "--data", root / "tokens.bin", "--data-order",
                      "sequential", "--batch-size", B,
                      "--seq-len", T, "--steps", STEPS, "--lr", LR, "--lr-schedule", "constant", "--warmup", 0,
                      "--weight-decay", WD, "--grad-clip", CLIP, "--threads-per-worker", 1, "--eval-every", 0,
                      "--backend", "mpi", "--out-dir", out)
    assert done.returncode == 0, done.stderr
    assert "all 2 ranks hold bit-identical weights" in done.stderr
    np.testing.assert_allclose([r["loss"] for r in read_metrics(out) if "loss" in r], losses, rtol=0, atol=1e-4)
    got = final(out)
    for name, value in adapters.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-4, err_msg=name)
