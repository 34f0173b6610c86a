"""bf16 precision and the GEMM engine: every operand layout the model uses against
a float64 product, bf16 rounding against PyTorch's, training accuracy against
PyTorch fp32 and bf16 autocast (native and with oneDNN capped to AVX2, so the
portable engine runs on any x86-64 CPU), 124M-shape gradients, and the missing extra."""
import ctypes

import numpy as np
import pytest
import torch

from conftest import REPO, launch, read_metrics, write_tiny_inputs
from test_parity import N_TOKENS, torch_reference, train_tiny
from torch_gpt2 import TorchGPT2, random_state
from trainer import gemm
from trainer.gpt import GPT
from trainer.params import PRESETS, GPTConfig, param_layout

ENGINES = ["numpy", "onednn", gemm.choose("bf16")[0], "emulated-bf16"]


@pytest.fixture
def engine(request):
    yield gemm.install(request.param)
    gemm.install("numpy")  # other in-process tests expect the default


def as_bf16(x):
    """x rounded to bf16, by PyTorch (independent of ml_dtypes), as float64."""
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("engine", sorted(set(ENGINES)), indirect=True)
def test_gemm_operand_layouts(engine):
    """Plain, transposed and column-sliced operands, as the model passes them."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80), dtype=np.float32)
    w = rng.standard_normal((80, 120), dtype=np.float32)
    low = (lambda x: x) if not engine.low else as_bf16
    cases = [("plain", a, w, slice(None)), ("a transposed", a.T.copy().T, w, slice(None)),
             ("w transposed", a, w.T.copy().T, slice(None)), ("column block", a, w, slice(40, 100))]
    for label, x, y, cols in cases:
        lx, ly = np.empty(x.shape, engine.low_dtype), np.empty(y.shape, engine.low_dtype)
        engine.to_low(lx, np.ascontiguousarray(x)) if engine.low else None
        engine.to_low(ly, np.ascontiguousarray(y)) if engine.low else None
        ox, oy = (lx, ly) if engine.low else (x, y)
        if label == "a transposed":
            ox = np.ascontiguousarray(ox.T).T
        if label == "w transposed":
            oy = np.ascontiguousarray(oy.T).T
        out = np.full((96, 120), np.nan, dtype=np.float32)
        gemm.matmul(out[:, cols], ox, oy[:, cols])
        expected = low(x) @ low(y)[:, cols]
        scale = np.abs(low(x)) @ np.abs(low(y)[:, cols])
        assert np.all(np.abs(out[:, cols] - expected) <= 1e-5 * scale + 1e-30), (engine.name, label)
        assert np.isnan(out[:, :40]).all() == (cols != slice(None)), "wrote outside its columns"
        gemm.matmul(out[:, cols], ox, oy[:, cols], accumulate=True)  # += (the lm head's later chunks)
        assert np.all(np.abs(out[:, cols] - 2 * expected) <= 2e-5 * scale + 1e-30), (engine.name, label)


def test_accumulate_without_a_cblas_symbol(monkeypatch):
    """Where NumPy's BLAS exports no cblas_sgemm, out += a @ b still holds."""
    engine = gemm.Engine("numpy")
    monkeypatch.setattr(gemm.Cblas, "find", classmethod(lambda cls: None))
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 20), dtype=np.float32), rng.standard_normal((20, 10), dtype=np.float32)
    out = np.ones((30, 10), dtype=np.float32)
    engine.matmul(out, a.T.copy().T, b, accumulate=True)
    assert engine.cblas is None
    np.testing.assert_allclose(out, 1 + a.astype(np.float64) @ b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", sorted({e for e in ENGINES if e.endswith("bf16")}), indirect=True)
def test_to_low_rounds_like_pytorch(engine):
    x = np.random.default_rng(1).standard_normal(200_000).astype(np.float32) * 3
    low = np.empty(x.shape, engine.low_dtype)
    engine.to_low(low, x)
    np.testing.assert_array_equal(low.astype(np.float64), as_bf16(x))


@pytest.fixture(scope="module")
def bf16_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    state, tokens = write_tiny_inputs(root, seed=0, n_tokens=N_TOKENS)
    fp32 = torch_reference(state, tokens)[0]
    autocast = torch_reference(state, tokens, bf16=True)[0]
    return root, np.array(fp32), np.array(autocast)


@pytest.mark.parametrize("cap", ["", "AVX2"])
@pytest.mark.parametrize("workers, parallel", [(1, "hybrid"), (2, "hybrid"), (2, "data")])
def test_bf16_training_accuracy(bf16_case, workers, parallel, cap):
    """8 steps, tiny model: every loss within 2e-2 of PyTorch fp32, and no further
    from it than 1.5x PyTorch's own bf16 autocast.  cap=AVX2: oneDNN has no bf16
    GEMM, so the portable engine (bf16-rounded inputs, fp32 GEMM) runs."""
    root, fp32, autocast = bf16_case
    env = {"ONEDNN_MAX_CPU_ISA": cap} if cap else None
    losses, _, _, stderr = train_tiny(root, workers, f"bf16-{parallel}{workers}-{cap or 'native'}",
                                      "--precision", "bf16", "--parallel", parallel, env=env)
    ours, theirs = np.abs(np.array(losses) - fp32).max(), np.abs(autocast - fp32).max()
    assert ours <= 2e-2 and ours <= 1.5 * theirs, (ours, theirs)
    if cap:
        assert "matmuls: bf16 emulated" in stderr and "--precision fp32 is faster" in stderr


@pytest.mark.slow
def test_gpt2_124m_bf16_gradients_align_with_fp32():
    """Each parameter's bf16 gradient against PyTorch's fp32 autograd: cosine >= 0.999."""
    p = PRESETS["gpt2"]
    cfg = GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"])
    state = random_state(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size, seed=0)
    B, T = 2, 64
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, B * T + 1)
    reference = TorchGPT2(state, cfg.n_layer, cfg.n_head)
    t = torch.from_numpy(tokens)
    reference(t[:-1].view(B, T), t[1:].view(B, T)).backward()
    expected = reference.grads()
    layout = param_layout(cfg)
    _, params = layout.allocate()
    _, grads = layout.allocate()
    for name, value in state.items():
        params[name][...] = value.numpy()
    del state, reference
    engine = gemm.install(gemm.choose("bf16")[0])
    try:
        low_flat = np.empty(layout.size, engine.low_dtype)
        low = layout.views(low_flat)
        for name in params:
            engine.to_low(low[name], params[name])
        model = GPT(cfg, B, T, params, grads, low_params=low)
        model.load_batch(tokens)
        model.forward(1.0 / (B * T))
        model.backward()
    finally:
        gemm.install("numpy")
    cosine = {name: float(np.dot(grads[name].ravel(), g.ravel().astype(np.float32))
                          / np.linalg.norm(grads[name]) / np.linalg.norm(g)) for name, g in expected.items()}
    worst = min(cosine, key=cosine.get)
    assert cosine[worst] >= 0.999, (worst, cosine[worst])


def test_bf16_without_the_extra_is_one_line(tmp_path):
    fake = tmp_path / "site" / "ml_dtypes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ml_dtypes')\n")
    out = tmp_path / "run"
    done = launch("--workers", 1, "--steps", 1, "--precision", "bf16", "--out-dir", out,
                  env={"PYTHONPATH": f"{tmp_path / 'site'}:{REPO}"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "coregpt: error: --precision bf16 needs ml_dtypes and oneDNN: pip install 'coregpt[bf16]'"]
    assert not out.exists()


def test_missing_onednn_and_libgomp_are_named(monkeypatch):
    monkeypatch.setattr(gemm, "_onednn", None)
    monkeypatch.setattr(gemm, "onednn_library", lambda: None)
    with pytest.raises(gemm.EngineError, match=r"pip install 'coregpt\[bf16\]'"):
        gemm.choose("bf16")
    assert gemm.choose("fp32")[0] == "numpy"  # fp32 falls back to NumPy's BLAS
    monkeypatch.setattr(gemm, "onednn_wheel_exists", lambda: False)  # macOS, ARM: no oneDNN wheel
    assert gemm.choose("bf16")[0] == "emulated-bf16"

    def no_gomp(path):
        raise OSError("libgomp.so.1: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(ctypes, "CDLL", no_gomp)
    with pytest.raises(gemm.EngineError, match="apt-get install libgomp1"):
        gemm.OneDNN("/somewhere/libdnnl.so.3")


def test_bad_precision_and_gemm_values(tmp_path):
    for flag, value in (("--precision", "fp16"), ("--gemm", "mkl")):
        done = launch("--steps", 1, flag, value, "--out-dir", tmp_path / "run")
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert flag in done.stderr and not (tmp_path / "run").exists()


def test_resume_keeps_bf16_bit_for_bit(tmp_path, bf16_case):
    """A bf16 run stopped after its step-4 checkpoint and resumed without
    --precision continues in bf16: every loss equals an uninterrupted run's."""
    root = bf16_case[0]
    whole, _, _, _ = train_tiny(root, 2, "bf16-whole", "--precision", "bf16")
    first = tmp_path / "first"
    common = ["train", "--init-from", root / "init", "--data", root / "tokens.bin", "--batch-size", 4,
              "--seq-len", 32, "--lr", 1e-3, "--lr-schedule", "constant", "--weight-decay", 0.1,
              "--workers", 2, "--threads-per-worker", 1, "--eval-every", 0]
    assert launch(*common, "--steps", 4, "--precision", "bf16", "--out-dir", first).returncode == 0
    done = launch("train", "--resume", "--out-dir", first, "--steps", 8)
    assert done.returncode == 0, done.stderr
    assert "matmuls: " in done.stderr and "bf16" in done.stderr.split("matmuls: ")[1].splitlines()[0]
    resumed = [r["loss"] for r in read_metrics(first) if "loss" in r]
    assert resumed == whole
