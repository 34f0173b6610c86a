"""Run features: bit-exact resume, Ctrl-C/SIGTERM, export, sampling, gradient
accumulation, plots, presets."""
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import REPO, TINY, launch, read_metrics, start_launch, write_tiny_inputs
from torch_gpt2 import TorchGPT2

pytestmark = pytest.mark.e2e  # each test runs python -m launch

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    state, _ = write_tiny_inputs(root, seed=4)
    return root, state


def flags(tiny, **overrides):
    root, _ = tiny
    values = dict(init_from=root / "init", data=root / "tokens.bin", batch_size=4, seq_len=32,
                  threads_per_worker=1, eval_every=0, workers=2)
    values.update(overrides)
    out = []
    for key, value in values.items():
        if value is True:
            out.append("--" + key.replace("_", "-"))
        elif value is not None:
            out += ["--" + key.replace("_", "-"), value]
    return out


def train_ok(*args, cpus=None):
    done = launch("train", *args, cpus=cpus)
    assert done.returncode == 0, done.stderr
    return done


def losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def checkpoint_files(run, step):
    ckpt = os.path.join(run, "checkpoints", f"step_{step:06d}")
    return load_file(os.path.join(ckpt, "model.safetensors")), load_file(
        os.path.join(ckpt, "optimizer.safetensors"))


@pytest.mark.parametrize("schedule, recompute, optim", [("constant", None, None), ("cosine", None, None),
                                                       ("cosine", True, None), ("cosine", None, "adamw8bit")])
def test_resume_is_bit_identical(tmp_path, tiny, schedule, recompute, optim):
    common = flags(tiny, steps=8, lr_schedule=schedule, warmup=2, lr=1e-3, recompute=recompute, optim=optim)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_ok(*common, "--out-dir", straight)
    train_ok(*common, "--ckpt-every", 4, "--out-dir", stopped)
    # the run dies right after its step-4 checkpoint: steps 5-8 and their checkpoint are lost
    shutil.rmtree(stopped / "checkpoints" / "step_000008")
    (stopped / "checkpoints" / "latest").write_text("step_000004\n")
    resumed = train_ok("--resume", "--out-dir", stopped)
    assert ("recomputing activations" in resumed.stderr) == bool(recompute)  # kept by --resume
    rows = read_metrics(stopped)
    assert [r["step"] for r in rows] == list(range(1, 9))  # replaced, not duplicated
    assert losses(stopped) == losses(straight)
    model, optimizer = checkpoint_files(straight, 8)
    assert optimizer["m.h.0.mlp.c_fc.weight"].dtype == (np.uint8 if optim else np.float32)  # kept by --resume
    assert optimizer["m.h.0.ln_1.bias"].dtype == np.float32  # under 4096 elements: fp32 moments
    for a, b in zip((model, optimizer), checkpoint_files(stopped, 8)):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_extends_steps(tmp_path, tiny):
    run = tmp_path / "run"
    train_ok(*flags(tiny, steps=3, lr_schedule="constant"), "--out-dir", run)
    # what a writer killed mid-checkpoint leaves behind is cleared by the next checkpoint
    (run / "checkpoints" / ".tmp-step_000004-99999").mkdir()
    done = train_ok("--resume", "--out-dir", run, "--steps", 5)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert "step      4/5" in done.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000005"
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000003", "step_000005"]


def test_resume_streams_the_checkpoint_and_checks_it_first(tmp_path, tiny):
    """--resume reads the checkpoint's headers before any worker starts: a missing or
    misshapen Adam moment is one line naming it, exit 2, and the run is untouched;
    a whole checkpoint is streamed into the arenas and the run continues."""
    from safetensors.numpy import save_file
    run = tmp_path / "run"
    train_ok(*flags(tiny, steps=2, lr_schedule="constant"), "--out-dir", run)
    optimizer = run / "checkpoints" / "step_000002" / "optimizer.safetensors"
    whole = load_file(optimizer)
    before = (run / "metrics.jsonl").read_text()
    for name, change in (("v.h.1.mlp.c_fc.bias", "is missing"), ("m.wpe.weight", "has shape (3, 64)")):
        damaged = dict(whole)
        if change == "is missing":
            del damaged[name]
        else:
            damaged[name] = damaged[name][:3]
        save_file(damaged, optimizer)
        done = launch("train", "--resume", "--out-dir", run, "--steps", 3)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1] == f"coregpt: error: {optimizer}: tensor {name} {change}" + (
            ", expected (64, 64)" if change != "is missing" else "")
        assert "Traceback" not in done.stderr and (run / "metrics.jsonl").read_text() == before
    save_file(whole, optimizer)
    train_ok("--resume", "--out-dir", run, "--steps", 3)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_the_step_in_flight(tmp_path, tiny, sig, code):
    run = tmp_path / "run"
    proc = start_launch("train", *flags(tiny, steps=100000), "--out-dir", run)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or len(losses(run)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    k = read_metrics(run)[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{k:06d}"
    done = train_ok("--resume", "--out-dir", run, "--steps", k + 2)
    first_step = next(line for line in done.stderr.splitlines() if line.startswith("step"))
    assert first_step.split("|")[0].split() == ["step", f"{k + 1}/{k + 2}"]


@pytest.mark.parametrize("parallel, recompute, ring", [("hybrid", None, None), ("data", None, None),
                                                        ("hybrid", True, None), ("data", True, None),
                                                        ("data", None, "1")])
def test_grad_accum_equals_larger_batch(tmp_path, tiny, parallel, recompute, ring, monkeypatch):
    """ring 1: the data strategy's buffers staged with one room for the layers'
    buckets (the tiny model's default ring would save nothing), so every worker
    stages and each micro-batch is reduced into the pool's gradient."""
    big, accum = tmp_path / "big", tmp_path / "accum"
    # in file order two windows of 2 rows are the one window of 4 rows
    train_ok(*flags(tiny, steps=4, batch_size=4, parallel=parallel, data_order="sequential"), "--out-dir", big)
    if ring:
        monkeypatch.setenv("COREGPT_GRAD_RING", ring)
    done = train_ok(*flags(tiny, steps=4, batch_size=2, grad_accum=2, parallel=parallel, recompute=recompute,
                           data_order="sequential"), "--out-dir", accum)
    assert ("gradients of worker 0 " in done.stderr) == bool(ring), done.stderr
    np.testing.assert_allclose(losses(accum), losses(big), rtol=0, atol=1e-5)
    # micro-batches sum a weight's gradient in another order than one GEMM over the whole
    # batch; where that gradient is near zero Adam turns the rounding into a fraction of lr
    # (1.1e-5 on an AVX2 EPYC with OpenBLAS), so weights get the bound they hold against
    # PyTorch (README, Exactness)
    a, b = checkpoint_files(big, 4)[0], checkpoint_files(accum, 4)[0]
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    run = tmp_path_factory.mktemp("trained") / "run"
    train_ok(*flags(tiny, steps=3), "--out-dir", run)
    return run


def test_export_llmc_header_values_and_loss(tmp_path, tiny, trained):
    out = tmp_path / "model.bin"
    done = launch("export", "--checkpoint", trained, "--format", "llmc", "--out", out)
    assert done.returncode == 0, done.stderr
    weights, _ = checkpoint_files(trained, 3)
    header = np.fromfile(out, dtype=np.int32, count=256)
    C, L, V = TINY["n_embd"], TINY["n_layer"], TINY["vocab"]
    assert list(header[:8]) == [20240326, 3, TINY["n_ctx"], V, L, TINY["n_head"], C, 50304]
    from test_weights import llmc_tensors
    expected = llmc_tensors({k: torch.from_numpy(v) for k, v in weights.items()}, 50304).numpy()
    body = np.fromfile(out, dtype=np.float32, offset=1024)
    np.testing.assert_array_equal(body, expected)
    # --init-from the export and from the checkpoint: the same first loss
    first = {}
    for name, source in (("ckpt", trained), ("bin", out)):
        train_ok(*flags(tiny, steps=1, init_from=source, no_checkpoint=True), "--out-dir", tmp_path / name)
        first[name] = losses(tmp_path / name)
    assert first["bin"] == first["ckpt"]


def test_export_hf_loads_in_transformers(tmp_path, trained):
    import transformers  # the [test] extra installs it; a missing one must fail, not skip
    out = tmp_path / "hf"
    done = launch("export", "--checkpoint", trained, "--format", "hf", "--out", out)
    assert done.returncode == 0, done.stderr
    weights, _ = checkpoint_files(trained, 3)
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(exported[name], weights[name])
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    reference = TorchGPT2({k: torch.from_numpy(v) for k, v in weights.items()},
                          TINY["n_layer"], TINY["n_head"])
    idx = torch.randint(0, TINY["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_loss = model(idx, labels=idx).loss.item()
        ref_loss = reference(idx[:, :-1], idx[:, 1:]).item()
    assert abs(hf_loss - ref_loss) < 1e-5
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(out)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_export_refuses_existing_output_and_unknown_format(tmp_path, trained):
    existing = tmp_path / "taken.bin"
    existing.write_text("mine")
    done = launch("export", "--checkpoint", trained, "--format", "llmc", "--out", existing)
    assert done.returncode == 2 and "already exists" in done.stderr
    assert existing.read_text() == "mine"
    done = launch("export", "--checkpoint", trained, "--format", "onnx", "--out", tmp_path / "x")
    assert done.returncode == 2 and "unknown --format 'onnx'" in done.stderr


def test_sample_greedy_matches_pytorch_and_seeds_repeat(tiny):
    root, state = tiny
    prompt = "To be, or not to be"
    greedy = launch("sample", "--checkpoint", root / "init", "--prompt", prompt,
                    "--max-new-tokens", 12, "--temperature", 0)
    assert greedy.returncode == 0, greedy.stderr
    from trainer.corpus import gpt2_encoding
    enc = gpt2_encoding()
    model = TorchGPT2(state, TINY["n_layer"], TINY["n_head"])
    ids = enc.encode(prompt)
    with torch.no_grad():
        for _ in range(12):  # full forward every token: no cache in the reference
            ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy.stdout == enc.decode(ids) + "\n"
    runs = [launch("sample", "--checkpoint", root / "init", "--prompt", prompt,
                   "--max-new-tokens", 20, "--seed", seed).stdout for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_plot_written_by_training_and_by_command(tmp_path, trained):
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "loss.png").unlink()
    done = launch("plot", copy)
    assert done.returncode == 0, done.stderr
    assert (copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_last_prunes_old_checkpoints(tmp_path, tiny):
    run = tmp_path / "run"
    train_ok(*flags(tiny, steps=6, ckpt_every=1, keep_last=2), "--out-dir", run)
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000005", "step_000006"]


@pytest.mark.parametrize("name", ["default.toml", "gpt2-shakespeare.toml", "gpt2-124m-throughput.toml"])
def test_presets_are_valid_configs(name):
    from launch.config import check, merge
    settings = merge(os.path.join(REPO, "configs", name), {})
    check(settings)
    assert settings.steps > 0
    if name == "gpt2-124m-throughput.toml":
        assert (settings.model, settings.batch_size, settings.seq_len) == ("gpt2", 4, 64)
    if name == "gpt2-shakespeare.toml":
        assert settings.init_from == "gpt2"


def test_resume_rechecks_workers_and_names_ignored_flags(tmp_path, tiny):
    run = tmp_path / "run"
    train_ok(*flags(tiny, steps=2, workers=1, threads_per_worker=2), "--out-dir", run, cpus=2)
    # on 2 CPUs, 2 workers x the saved 2 threads would oversubscribe: threads are derived again
    done = train_ok("--resume", "--out-dir", run, "--steps", 3, "--workers", 2, "--lr", 0.5, cpus=2)
    assert "on 2 worker(s) x 1 thread(s)" in done.stderr
    assert "ignored: --lr" in done.stderr
    assert [r["lr"] for r in read_metrics(run)][-1] != 0.5
