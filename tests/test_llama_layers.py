"""The Llama family's layers (trainer/llama_layers.py) against transformers' own:
LlamaRMSNorm, LlamaRotaryEmbedding's tables and apply_rotary_pos_emb (default and
Llama 3's rope scaling, at positions after a cached prefix) and LlamaMLP's SwiGLU,
forward and autograd's backward."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from trainer.llama_layers import (rmsnorm_backward, rmsnorm_forward, rmsnorm_weights_backward, rope_backward,
                                  rope_forward, rope_frequencies, rope_tables, swiglu_backward, swiglu_forward)

F32 = np.float32
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # wavelengths on both sides of 16 and 64: all three regimes


def relative(ours, theirs):
    theirs = theirs.detach().double().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_rmsnorm_matches_transformers():
    rng = np.random.default_rng(0)
    N, C, eps = 48, 64, 1e-5
    x = (3 * rng.standard_normal((N, C))).astype(F32)
    w = (1 + 0.1 * rng.standard_normal(C)).astype(F32)
    dout, dres = rng.standard_normal((N, C)).astype(F32), rng.standard_normal((N, C)).astype(F32)
    norm = LlamaRMSNorm(C, eps=eps)
    norm.weight.data = torch.from_numpy(w.copy())
    xt = torch.from_numpy(x.copy()).requires_grad_()
    y = norm(xt)
    y.backward(torch.from_numpy(dout))
    out, rstd, dx, dw = np.empty((N, C), F32), np.empty((N, 1), F32), np.empty((N, C), F32), np.empty(C, F32)
    scratch = np.empty((N, C), F32), np.empty((N, C), F32), np.empty((N, 1), F32)
    rmsnorm_forward(out, rstd, x, w, eps)
    rmsnorm_backward(dx, dres, dout, x, rstd, w, *scratch)
    rmsnorm_weights_backward(dw, dout, x, rstd, scratch[0])
    assert relative(out, y) < 1e-6
    assert relative(dx - dres, xt.grad) < 1e-5
    assert relative(dw, norm.weight.grad) < 1e-5


@pytest.mark.parametrize("scaling", [None, LLAMA3])
@pytest.mark.parametrize("heads, head_size, theta, first", [(4, 16, 10000.0, 0), (2, 32, 500000.0, 37)])
def test_rope_matches_transformers(scaling, heads, head_size, theta, first):
    B, T = 2, 40
    config = LlamaConfig(hidden_size=heads * head_size, num_attention_heads=heads, num_key_value_heads=heads,
                         rope_theta=theta, max_position_embeddings=512,
                         rope_scaling=scaling and dict(scaling, rope_theta=theta))  # v5 reads theta from there
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(first, first + T)[None].expand(B, T)
    cos_t, sin_t = rotary(torch.zeros(B, T, heads * head_size), positions)  # (B, T, HS), float32
    inv_freq = rope_frequencies(head_size, theta, scaling)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=2e-7)
    cos, sin = np.empty((T, head_size // 2), F32), np.empty((T, head_size // 2), F32)
    rope_tables(cos, sin, np.arange(first, first + cos.shape[0]), inv_freq)
    assert np.abs(cos - cos_t[0, :, :head_size // 2].numpy()).max() < 1e-6
    assert np.abs(sin - sin_t[0, :, head_size // 2:].numpy()).max() < 1e-6

    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, heads, head_size)).astype(F32)
    grad = rng.standard_normal((B, T, heads, head_size)).astype(F32)
    xt = torch.from_numpy(x.copy()).transpose(1, 2).requires_grad_()  # transformers': (B, H, T, HS)
    y, _ = apply_rotary_pos_emb(xt, xt.detach(), cos_t, sin_t)
    y.backward(torch.from_numpy(grad).transpose(1, 2))
    tmp = np.empty_like(x)
    rope_forward(x, cos, sin, tmp)
    rope_backward(grad, cos, sin, tmp)
    assert relative(x, y.transpose(1, 2)) < 2e-6
    assert relative(grad, xt.grad.transpose(1, 2)) < 2e-6


def test_swiglu_matches_silu_gate():
    rng = np.random.default_rng(2)
    N, F = 32, 96
    gate = (4 * rng.standard_normal((N, F))).astype(F32)
    gate[0, :4] = (-200, -30, 0, 200)  # far out on both sides: no overflow, exact limits
    up, dout = rng.standard_normal((N, F)).astype(F32), rng.standard_normal((N, F)).astype(F32)
    g, u = (torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (gate, up))
    y = torch.nn.functional.silu(g) * u
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    out, dgate, dup, tmp = (np.empty((N, F), F32) for _ in range(4))
    with np.errstate(all="raise"):
        swiglu_forward(out, gate, up)
        swiglu_backward(dgate, dup, dout, gate, up, tmp)
    assert relative(out, y) < 1e-6
    assert relative(dgate, g.grad) < 1e-6
    assert relative(dup, u.grad) < 1e-6
