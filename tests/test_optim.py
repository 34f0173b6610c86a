"""AdamW (trainer.optim.adamw_update) against torch.optim.AdamW under every engine: the
NumPy passes and, where oneDNN is loaded, the fused passes over whole FUSED_BLOCKs."""
import numpy as np
import pytest
import torch

from test_precision import ENGINES
from trainer import optim


@pytest.mark.parametrize("engine", sorted(set(ENGINES)), indirect=True)
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_adamw_steps_match_pytorch(engine, weight_decay):
    """Six steps on a slice of two fused blocks and a tail (each part runs its own
    path), with a clip scale below 1 and a changing LR, as clip_grad_norm_ then
    AdamW.step() do them; the bf16 copy is the updated weights rounded."""
    n = 2 * optim.FUSED_BLOCK + 12345
    rng = np.random.default_rng(0)
    p = rng.normal(0, 0.5, n).astype(np.float32)
    m, v, tmp = np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty(optim.BLOCK, np.float32)
    low = np.empty(n, engine.low_dtype)
    theirs = torch.tensor(p, requires_grad=True)
    betas, eps = (0.9, 0.95), 1e-8
    opt = torch.optim.AdamW([theirs], lr=1.0, betas=betas, eps=eps, weight_decay=weight_decay)
    for t, lr in enumerate([6e-4, 5e-4, 3e-4, 3e-4, 1e-4, 2e-3], start=1):
        g = rng.normal(0, 1e-3, n).astype(np.float32)
        g[::97] = 0  # moments that decay towards zero
        scale = 0.7
        theirs.grad = torch.tensor(g) * scale
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        optim.adamw_update(p, g, m, v, tmp, optim.Hyper(lr, t, betas[0], betas[1], eps, weight_decay, scale),
                           engine=engine, p_low=low if engine.low else None)
        want = theirs.detach().numpy()
        state = opt.state[theirs]
        # the weights: at most one ulp of the largest a step (the fused pass rounds
        # decay·p + update once, PyTorch twice; measured <= 3 ulps after 6 steps); the
        # moments to ~10 ulps of their largest (PyTorch scales the gradient first, we
        # fold the scale into the coefficients)
        assert np.abs(p - want).max() <= t * np.spacing(np.abs(want).max()), (engine.name, t)
        for ours, key in ((m, "exp_avg"), (v, "exp_avg_sq")):
            exact = state[key].numpy()
            assert np.abs(ours - exact).max() <= 1e-6 * np.abs(exact).max(), (engine.name, t, key)
        if engine.low:
            assert np.array_equal(low.astype(np.float32), torch.tensor(p).to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("engine, expected", [("numpy", 0), ("onednn", optim.FUSED_BLOCK)],
                         indirect=["engine"])
def test_adamw_fused_runs_where_onednn_is(engine, expected):
    """The fused path covers the whole blocks (and only them) when oneDNN is loaded."""
    arrays = [np.ones(optim.FUSED_BLOCK + 10, np.float32) for _ in range(4)]
    done = optim.adamw_fused(engine, *arrays, None, optim.Coefficients(beta1=0.9, beta2=0.95, m_coef=0.1, v_coef=0.05,
                                                                       inv_bc2=1.0, eps=1e-8, step_size=1e-3,
                                                                       decay=1.0))
    assert done == expected, engine.name


@pytest.mark.parametrize("engine", ["onednn"], indirect=True)
def test_a_changing_lr_keeps_few_primitives(engine):
    """(1 − lr·λ) is baked into the fused pass's primitive: a schedule that changes the
    LR every step makes a new one each step, and the old ones are destroyed."""
    n = optim.FUSED_BLOCK
    p, g = np.ones(n, np.float32), np.full(n, 1e-3, np.float32)
    m, v, tmp = np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty(optim.BLOCK, np.float32)
    for t in range(1, 3 * engine.primitives.BINARY_KEPT):
        before = p.copy()
        optim.adamw_update(p, g, m, v, tmp, optim.Hyper(lr=1e-3 / t, t=t, beta1=0.9, beta2=0.95, eps=1e-8,
                                                        weight_decay=0.1), engine=engine)
        # Δp = lr·(1 + λp): m̂ / √v̂ = 1 for a constant gradient; Δp read to an ulp of p
        assert np.allclose(before - p, 1e-3 / t * (1 + 0.1 * before), rtol=1e-4, atol=2.5e-7), t
    assert len(engine.primitives.made_binary) <= engine.primitives.BINARY_KEPT
