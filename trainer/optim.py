"""AdamW (torch.optim.AdamW semantics), global-norm clipping and the LR schedule."""
import math
from typing import NamedTuple

import numpy as np

BLOCK = 1 << 16  # floats per cache block: 4 arrays × 256 KB stay in L2
# floats per block of the fused update (oneDNN): few enough calls that their ~10 µs
# each is a few percent of the time, small enough that the block stays in L2/L3
# between its three passes
FUSED_BLOCK = 1 << 17
SUM_ROW = 4096  # floats per fp32 partial sum of squares


def sum_squares(x):
    """Σ x² of a flat float32 array as a Python float: fp32 sums of SUM_ROW squares,
    added in float64.  One fp32 dot over millions of elements (BLAS sdot) drifts by
    ~1e-4 relative; rows of 4096 keep every partial sum exact to ~1e-7."""
    n = x.size - x.size % SUM_ROW
    rows = x[:n].reshape(-1, SUM_ROW)
    tail = x[n:].astype(np.float64)  # < SUM_ROW floats
    return float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64)) + float(tail @ tail)


def lr_at(step, lr, schedule, warmup, steps, min_lr):
    """LR for optimizer step `step` (1-based): linear warmup over `warmup` steps,
    then constant or cosine from lr down to min_lr at the last step."""
    it = step - 1
    if it < warmup:
        return lr * (it + 1) / warmup
    if schedule == "constant":
        return lr
    ratio = (it - warmup) / max(1, steps - 1 - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (lr - min_lr)


def clip_scale(grad_norm, max_norm):
    """torch.nn.utils.clip_grad_norm_: grads are multiplied by min(1, max/(norm+1e-6))."""
    if not max_norm or max_norm <= 0:
        return 1.0
    return float(min(np.float32(1.0), np.float32(max_norm) / np.float32(grad_norm + 1e-6)))


class Hyper(NamedTuple):
    """One AdamW step's hyper-parameters: t is the optimizer's step count; the
    gradients are multiplied by grad_scale (the clip factor)."""
    lr: float
    t: int
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_scale: float = 1.0


class Coefficients(NamedTuple):
    """AdamW's step as adamw_fused applies it: m = β₁m + c₁g, v = β₂v + c₂g²,
    p = decay·p − step_size · m / (√(v · inv_bc2) + eps)."""
    beta1: float
    beta2: float
    m_coef: np.float32
    v_coef: np.float32
    inv_bc2: float
    eps: float
    step_size: float
    decay: float


def adamw_update(p, g, m, v, tmp, hyper, *, engine, p_low=None):
    """One AdamW step (hyper: Hyper) over flat float32 slices, block by block so
    each block is read from memory once.  The clipping scale grad_scale is folded
    into the moments' coefficients, so g is only read (writing it back would add 4
    of the 30 bytes per parameter the step moves); tmp is a scratch of at least
    BLOCK floats; p_low, if given, receives the updated p rounded to bf16 (the
    weights bf16 matmuls read, by `engine`).  Where the engine has oneDNN, whole
    FUSED_BLOCKs take three fused passes each (adamw_fused), the rest NumPy's
    fourteen."""
    lr, t, beta1, beta2, eps, weight_decay, grad_scale = hyper
    step_size = lr / (1.0 - beta1 ** t)
    inv_bc2_sqrt = 1.0 / math.sqrt(1.0 - beta2 ** t)
    decay = 1.0 - lr * weight_decay
    m_coef, v_coef = np.float32((1.0 - beta1) * grad_scale), np.float32((1.0 - beta2) * grad_scale ** 2)
    fused = adamw_fused(engine, p, g, m, v, p_low, Coefficients(beta1, beta2, m_coef, v_coef, inv_bc2_sqrt ** 2,
                                                                eps, step_size, decay))
    for s in range(fused, p.size, BLOCK):
        e = min(s + BLOCK, p.size)
        pb, gb, mb, vb, tb = p[s:e], g[s:e], m[s:e], v[s:e], tmp[:e - s]
        mb *= np.float32(beta1)
        np.multiply(gb, m_coef, out=tb)
        mb += tb
        vb *= np.float32(beta2)
        np.multiply(gb, gb, out=tb)
        tb *= v_coef
        vb += tb
        np.sqrt(vb, out=tb)
        tb *= np.float32(inv_bc2_sqrt)
        tb += np.float32(eps)
        np.divide(mb, tb, out=tb)
        tb *= np.float32(step_size)
        if weight_decay:
            pb *= np.float32(decay)
        pb -= tb
        if p_low is not None:
            engine.to_low(p_low[s:e], pb)


def adamw_fused(engine, p, g, m, v, p_low, coefficients):
    """AdamW (Coefficients) on the whole FUSED_BLOCKs at the start of the slices, each in three oneDNN
    passes that read and write every array once (on a Zen 4 ~1.3 ns a parameter, about
    what memory allows, against ~2.1 for NumPy's fourteen): m = β₁m + c₁g,
    v = β₂v + c₂g², then p = (1 − lr·λ)p − step · m / (√(v / (1 − β₂ᵗ)) + ε), the
    textbook form of PyTorch's √v / √(1 − β₂ᵗ) (the same to an ulp or two).
    -> floats updated (0 without oneDNN)."""
    end = p.size - p.size % FUSED_BLOCK
    if end == 0 or engine.primitives is None:
        return 0
    beta1, beta2, m_coef, v_coef, inv_bc2, eps, step_size, decay = coefficients
    scalars = np.array([m_coef, v_coef, inv_bc2, eps, -step_size], dtype=np.float32)
    c1, c2, inv_bc2, eps, minus_step = (scalars[i:i + 1] for i in range(5))
    for s in range(0, end, FUSED_BLOCK):
        e = s + FUSED_BLOCK
        pb, gb, mb, vb = p[s:e], g[s:e], m[s:e], v[s:e]
        engine.binary(mb, "mul", gb, c1, sum_scale=beta1)
        engine.binary(vb, "mul", gb, gb, [("mul", c2)], sum_scale=beta2)
        engine.binary(pb, "mul", vb, inv_bc2, [("sqrt", None), ("add", eps), ("reciprocal", None), ("mul", mb),
                                               ("mul", minus_step)], sum_scale=decay)
        if p_low is not None:
            engine.to_low(p_low[s:e], pb)
    return end
