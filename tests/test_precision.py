"""bf16 precision and the GEMM engine: every operand layout the model uses against
a float64 product, bf16 rounding against PyTorch's, training accuracy against
PyTorch fp32 and bf16 autocast (native and with oneDNN capped to AVX2, so the
portable engine runs on any x86-64 CPU), 124M-shape gradients, and the missing extra."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, launch, read_metrics, write_tiny_inputs
from references import N_TOKENS, torch_reference, train_tiny
from torch_gpt2 import TorchGPT2, random_state
from trainer import gemm
from trainer.model import Layers
from trainer.models.gpt2 import Model as GPT
from trainer.trainable import Full, Weights
from trainer.models import param_layout
from trainer.models.gpt2 import PRESETS, GPTConfig

ENGINES = ["numpy", "onednn", gemm.choose("bf16")[0], "emulated-bf16"]


def as_bf16(x):
    """x rounded to bf16, by PyTorch (independent of ml_dtypes), as float64."""
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("widen", [gemm.WIDEN, 1000], ids=["whole", "in blocks"])
@pytest.mark.parametrize("engine", sorted(set(ENGINES)), indirect=True)
def test_gemm_operand_layouts(engine, widen, monkeypatch):
    """Plain, transposed and column-sliced operands, as the model passes them, the
    weight (w) stored as the engine stores weights' copies (bf16 where it emulates
    bf16: widened whole, or a block of rows or columns at a time)."""
    monkeypatch.setattr(gemm, "WIDEN", widen)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80), dtype=np.float32)
    w = rng.standard_normal((80, 120), dtype=np.float32)
    low = (lambda x: x) if not engine.low else as_bf16
    cases = [("plain", a, w, slice(None)), ("a transposed", a.T.copy().T, w, slice(None)),
             ("w transposed", a, w.T.copy().T, slice(None)), ("column block", a, w, slice(40, 100))]
    for label, x, y, cols in cases:
        lx, ly = np.empty(x.shape, engine.low_dtype), np.empty(y.shape, engine.weight_dtype)
        engine.to_low(lx, np.ascontiguousarray(x)) if engine.low else None
        engine.to_low(ly, np.ascontiguousarray(y)) if engine.low else None
        ox, oy = (lx, ly) if engine.low else (x, y)
        if label == "a transposed":
            ox = np.ascontiguousarray(ox.T).T
        if label == "w transposed":
            oy = np.ascontiguousarray(oy.T).T
        out = np.full((96, 120), np.nan, dtype=np.float32)
        engine.matmul(out[:, cols], ox, oy[:, cols])
        expected = low(x) @ low(y)[:, cols]
        scale = np.abs(low(x)) @ np.abs(low(y)[:, cols])
        assert np.all(np.abs(out[:, cols] - expected) <= 1e-5 * scale + 1e-30), (engine.name, label)
        assert np.isnan(out[:, :40]).all() == (cols != slice(None)), "wrote outside its columns"
        engine.matmul(out[:, cols], ox, oy[:, cols], accumulate=True)  # += (the lm head's later chunks)
        assert np.all(np.abs(out[:, cols] - 2 * expected) <= 2e-5 * scale + 1e-30), (engine.name, label)


@pytest.mark.parametrize("engine", sorted(set(ENGINES)), indirect=True)
def test_batched_operand_layouts(engine):
    """Engine.batched on stacks of heads as attention passes them: strided head views of
    a (B,T,3C) array, a transposed operand, a strided output, the scale and +=."""
    B, T, NH, HS = 2, 40, 3, 8
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((B, T, 3 * NH * HS), dtype=np.float32)
    low = np.empty(qkv.shape, engine.low_dtype)
    engine.to_low(low, qkv) if engine.low else None
    heads = (low if engine.low else qkv).reshape(B, T, 3, NH, HS)
    q, k = heads[:, :, 0].transpose(0, 2, 1, 3), heads[:, :, 1].transpose(0, 2, 1, 3)
    exact = (as_bf16 if engine.low else np.float64)(qkv).reshape(B, T, 3, NH, HS)
    eq, ek = exact[:, :, 0].transpose(0, 2, 1, 3), exact[:, :, 1].transpose(0, 2, 1, 3)
    scores = np.full((B, NH, 16, 24), np.nan, dtype=np.float32)
    engine.batched(scores, k[:, :, 8:24], q[:, :, 0:24].swapaxes(-1, -2), scale=0.25)
    expected = 0.25 * eq[:, :, 0:24] @ ek[:, :, 8:24].swapaxes(-1, -2)
    np.testing.assert_allclose(scores, expected.swapaxes(-1, -2), rtol=0, atol=1e-5)
    into = np.full((B, T, NH * HS), np.nan, dtype=np.float32)  # a strided output, as dq in dqkv
    out = into.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)[:, :, 4:20]
    a = np.ascontiguousarray(scores[:, :, :, :16]).astype(k.dtype)
    engine.batched(out, a.swapaxes(-1, -2), k[:, :, 8:24])
    engine.batched(out, a.swapaxes(-1, -2), k[:, :, 8:24], accumulate=True)
    expected = 2 * a.astype(np.float64).swapaxes(-1, -2) @ ek[:, :, 8:24]
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    assert np.isnan(into[:, :4]).all() and np.isnan(into[:, 20:]).all(), "wrote outside its rows"


@pytest.mark.parametrize("engine", sorted(set(ENGINES)), indirect=True)
def test_batched_post_ops(engine):
    """The element-wise chain attention fuses into its matmuls, in order: scale, then
    each op (a mask broadcast over the heads, dense operands, exp), then += what out
    held; and in oneDNN's bf16 engine a bf16 output rounded once, at the end."""
    rng = np.random.default_rng(4)
    B, NH, M, N, K = 2, 3, 16, 24, 8
    a, b = rng.standard_normal((B, NH, M, K), dtype=np.float32), rng.standard_normal((B, NH, K, N), dtype=np.float32)
    if engine.low:
        la, lb = np.empty(a.shape, engine.low_dtype), np.empty(b.shape, engine.low_dtype)
        engine.to_low(la, a), engine.to_low(lb, b)
        a, b, exact = la, lb, as_bf16(a) @ as_bf16(b)
    else:
        exact = a.astype(np.float64) @ b
    mask = np.where(rng.random((1, 1, M, N)) < 0.3, -np.inf, 0).astype(np.float32)
    rows = rng.standard_normal((B, NH, M, N), dtype=np.float32)
    other = rng.standard_normal((B, NH, M, N), dtype=np.float32)
    out = np.ones((B, NH, M, N), np.float32)
    engine.batched(out, a, b, accumulate=True, scale=0.5,
                   post=[("add", mask), ("sub", rows), ("exp", None), ("mul", other)])
    expected = 1 + np.exp(0.5 * exact + mask - rows) * other
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    if engine.writes_low:
        low = np.empty(out.shape, engine.low_dtype)
        engine.batched(low, a, b, post=[("sub", rows), ("mul", other)])
        np.testing.assert_allclose(low.astype(np.float64), (exact - rows) * other, rtol=2 ** -8, atol=1e-6)


def test_stacks_of_two_batch_axes_become_one():
    """(B,NH,M,N) stacks reach oneDNN as (1,B·NH,M,N) views (no copy), a mask shared by
    all of them as (1,1,M,N); an operand broadcast along B only keeps the 4-D call."""
    out, a = np.zeros((2, 3, 4, 5), np.float32), np.zeros((2, 3, 6, 4), np.float32)
    b, mask = np.zeros((2, 3, 5, 6), np.float32).swapaxes(-1, -2), np.zeros((1, 1, 4, 5), np.float32)
    flat = gemm.one_batch_axis([out, a, b, mask])
    assert [x.shape for x in flat] == [(1, 6, 4, 5), (1, 6, 6, 4), (1, 6, 6, 5), (1, 1, 4, 5)]
    assert all(np.shares_memory(x, y) for x, y in zip(flat, [out, a, b, mask]))
    assert gemm.one_batch_axis([out, a, b, np.zeros((1, 3, 4, 5), np.float32)]) is None
    assert gemm.one_batch_axis([out[:1], a[:1], b[:1]]) is None  # one matrix stack already


@pytest.mark.parametrize("name", ["onednn", "onednn-bf16"])
def test_attention_runs_no_reference_kernel(name):
    """Every attention matmul of two batch rows (the hybrid strategy's T=64 shape) runs
    on oneDNN's optimised kernels: its reference ones are correct but 500x slower (a
    mask broadcast over two batch axes sent them there, 5 s a step at T=64)."""
    if gemm.onednn_library() is None or not gemm.onednn().has(gemm.ISA_AVX512_CORE) or \
            (name == "onednn-bf16" and gemm.choose("bf16")[0] != name):
        pytest.skip("oneDNN's brgemm kernels need AVX-512 (and bf16 units for bf16)")
    code = (f"import numpy as np; from trainer import gemm, attention\n"
            f"work = attention.Workspace(gemm.Engine('{name}'))\n"
            "B, T, NH, C = 2, 64, 4, 64\n"
            "rng = np.random.default_rng(0); qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)\n"
            "out, lse, dqkv = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32), np.zeros_like(qkv)\n"
            "attention.attention_forward(work, out, lse, qkv, NH, block=32)\n"
            "dout = rng.standard_normal((B, T, C), dtype=np.float32)\n"
            "attention.attention_backward(work, dqkv, dout, qkv, out, lse, NH, block=32)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, ONEDNN_VERBOSE="1", PYTHONPATH=REPO))
    assert run.returncode == 0, run.stderr
    executed = [line for line in run.stdout.splitlines() if line.startswith("onednn_verbose,exec,cpu,matmul")]
    assert len(executed) > 20
    assert not [line for line in executed if ",ref:" in line], [line for line in executed if ",ref:" in line][:2]


@pytest.mark.parametrize("engine", sorted({e for e in ENGINES if e.endswith("bf16")}), indirect=True)
def test_bf16_attention_multiplies_bf16_inputs(engine):
    """In bf16 attention's matmuls read bf16 copies (q, k, v, P, dO, dS): oneDNN's bf16
    units and the portable engine (ml_dtypes rounding, then an fp32 GEMM) agree, and
    both stay within bf16's precision of PyTorch's float64 attention."""
    from trainer.attention import Workspace, attention_backward, attention_forward
    B, T, NH, HS = 2, 48, 3, 16
    C = NH * HS
    rng = np.random.default_rng(3)
    qkv = rng.normal(0, 1, (B, T, 3 * C)).astype(np.float32)
    dout = rng.normal(0, 1, (B, T, C)).astype(np.float32)

    def run(name):
        work = Workspace(gemm.Engine(name))
        out, lse, dqkv = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32), np.zeros_like(qkv)
        attention_forward(work, out, lse, qkv, NH, block=16)
        attention_backward(work, dqkv, dout, qkv, out, lse, NH, block=16)
        return out, dqkv
    ours, portable = run(engine.name), run("emulated-bf16")
    reference = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (x.view(B, T, NH, HS).transpose(1, 2) for x in reference.split(C, dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    for mine, other, exact in zip(ours, portable, (y.detach().numpy(), reference.grad.numpy())):
        scale = np.abs(exact).max()
        assert np.abs(mine - other).max() <= 1e-5 * scale  # the same rounding, summed in another order
        assert 1e-4 * scale <= np.abs(mine - exact).max() <= 1e-2 * scale  # bf16 inputs, not fp32


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
@pytest.mark.e2e
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


@pytest.mark.system
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
    engine = gemm.Engine(gemm.choose("bf16")[0])
    low_flat = np.empty(layout.size, engine.low_dtype)
    low = layout.views(low_flat)
    for name in params:
        engine.to_low(low[name], params[name])
    model = GPT(cfg, B, T, Weights(params, Full(cfg), low), grads, layers=Layers(engine))
    model.load_batch(tokens)
    model.forward(1.0 / (B * T))
    model.backward()
    cosine = {name: float(np.dot(grads[name].ravel(), g.ravel().astype(np.float32))
                          / np.linalg.norm(grads[name]) / np.linalg.norm(g)) for name, g in expected.items()}
    worst = min(cosine, key=cosine.get)
    assert cosine[worst] >= 0.999, (worst, cosine[worst])


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_bad_precision_and_gemm_values(tmp_path):
    for flag, value in (("--precision", "fp16"), ("--gemm", "mkl")):
        done = launch("--steps", 1, flag, value, "--out-dir", tmp_path / "run")
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert flag in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_resume_keeps_bf16_bit_for_bit(tmp_path, bf16_case):
    """A bf16 run stopped after its step-4 checkpoint and resumed without
    --precision continues in bf16: every loss equals an uninterrupted run's."""
    root = bf16_case[0]
    whole, _, _, _ = train_tiny(root, 2, "bf16-whole", "--precision", "bf16")
    first = tmp_path / "first"
    common = ["train", "--init-from", root / "init", "--data", root / "tokens.bin", "--data-order", "sequential",
              "--batch-size", 4,
              "--seq-len", 32, "--lr", 1e-3, "--lr-schedule", "constant", "--weight-decay", 0.1,
              "--workers", 2, "--threads-per-worker", 1, "--eval-every", 0]
    assert launch(*common, "--steps", 4, "--precision", "bf16", "--out-dir", first).returncode == 0
    done = launch("train", "--resume", "--out-dir", first, "--steps", 8)
    assert done.returncode == 0, done.stderr
    assert "matmuls: " in done.stderr and "bf16" in done.stderr.split("matmuls: ")[1].splitlines()[0]
    resumed = [r["loss"] for r in read_metrics(first) if "loss" in r]
    assert resumed == whole
