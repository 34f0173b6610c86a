"""Causal self-attention without the T x T matrix (FlashAttention-2's algorithm, in
NumPy): queries and keys in blocks, an online softmax in fp32, and only the output
and each row's logsumexp kept for the backward, which recomputes every block's
scores.  Blocks above the diagonal are skipped.  All (batch, head) pairs of a block
go through one batched matmul.

Shapes: qkv (B,T,3C) as c_attn writes it; out (B,T',C) for the T' = T − start
queries at positions start… (start > 0 when earlier keys and values are cached);
lse (B,NH,T').  Heads are copied once per call into head-major scratch so every
block's matmul reads contiguous rows.
"""
import os

import numpy as np

# queries and keys per block: one head's 128 x 128 fp32 scores (64 KB) stay in L2.
# COREGPT_ATTENTION_BLOCK shrinks it (the tests: T=32 then spans several blocks).
BLOCK = int(os.environ.get("COREGPT_ATTENTION_BLOCK", 128))

_scratch = {}


def scratch(name, shape, dtype=np.float32):
    """A buffer reused across calls (allocated once per name and shape)."""
    key = (name, shape, np.dtype(dtype))
    if key not in _scratch:
        _scratch[key] = np.empty(shape, dtype=dtype)
    return _scratch[key]


def heads(x, n_head, parts, name, first_scale=None):
    """(B,T,parts·C) -> `parts` contiguous (B,NH,T,HS) copies (scratch); the first
    multiplied by first_scale if given (q by 1/√HS: then q·kᵀ are the scores)."""
    B, T, width = x.shape
    hs = width // parts // n_head
    split = x.reshape(B, T, parts, n_head, hs)
    out = []
    for i in range(parts):
        buf = scratch(f"{name}{i}", (B, n_head, T, hs))
        if i == 0 and first_scale is not None:
            np.multiply(split[:, :, i].transpose(0, 2, 1, 3), first_scale, out=buf)
        else:
            np.copyto(buf, split[:, :, i].transpose(0, 2, 1, 3))
        out.append(buf)
    return out


def causal_mask(scores, q0, k0):
    """-inf where key k0+c comes after query q0+r (in place, on a block)."""
    bq, bk = scores.shape[-2:]
    if k0 + bk - 1 <= q0:
        return
    after = np.arange(k0, k0 + bk)[None, :] > np.arange(q0, q0 + bq)[:, None]
    scores[..., after] = -np.inf


def attention_forward(out, lse, qkv, n_head, start=0, block=None):
    """qkv (B,T,3C) -> out (B,T−start,C), lse (B,NH,T−start)."""
    B, T, C3 = qkv.shape
    C, n, block = C3 // 3, T - start, block or BLOCK
    hs = C // n_head
    q, k, v = heads(qkv, n_head, 3, "qkv", np.float32(1.0 / np.sqrt(hs)))
    y = out.reshape(B, n, n_head, hs).transpose(0, 2, 1, 3)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        bq = i1 - i0
        q_i = q[:, :, start + i0:start + i1]
        m = scratch("m", (B, n_head, bq, 1))
        row = scratch("row", (B, n_head, bq, 1))
        l = scratch("l", (B, n_head, bq, 1))
        acc = scratch("acc", (B, n_head, bq, hs))
        pv = scratch("pv", (B, n_head, bq, hs))
        m.fill(-np.inf)
        l.fill(0)
        acc.fill(0)
        for j0 in range(0, start + i1, block):
            j1 = min(j0 + block, start + i1)
            s = scratch("s", (B, n_head, bq, j1 - j0))
            np.matmul(q_i, k[:, :, j0:j1].swapaxes(-1, -2), out=s)
            causal_mask(s, start + i0, j0)
            np.max(s, axis=-1, keepdims=True, out=row)
            np.maximum(row, m, out=row)  # the new running max
            s -= row
            np.exp(s, out=s)
            np.subtract(m, row, out=m)
            np.exp(m, out=m)  # exp(old max − new max): rescales what was summed so far
            l *= m
            acc *= m
            l += np.sum(s, axis=-1, keepdims=True, out=m)
            np.matmul(s, v[:, :, j0:j1], out=pv)
            acc += pv
            m[...] = row
        acc /= l
        y[:, :, i0:i1] = acc
        np.log(l, out=l)
        l += m
        lse[:, :, i0:i1] = l[..., 0]


def attention_backward(dqkv, dout, qkv, out, lse, n_head, block=None):
    """dout (B,T,C) -> dqkv (B,T,3C) overwritten; out and lse as the forward left them."""
    B, T, C3 = qkv.shape
    C, block = C3 // 3, block or BLOCK
    hs = C // n_head
    scale = np.float32(1.0 / np.sqrt(hs))
    q, k, v = heads(qkv, n_head, 3, "qkv", scale)  # q scaled: dK = dSᵀ·q includes the scale
    (do,) = heads(dout, n_head, 1, "dout")
    (o,) = heads(out, n_head, 1, "out")
    d = scratch("D", (B, n_head, T, 1))
    np.einsum("bhtd,bhtd->bht", do, o, out=d[..., 0])  # D = rowsum(dO ∘ O)
    dq, dk, dv = (scratch(f"d{name}", (B, n_head, T, hs)) for name in "qkv")
    dq.fill(0)
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        k_j, v_j = k[:, :, j0:j1], v[:, :, j0:j1]
        dk_j, dv_j = dk[:, :, j0:j1], dv[:, :, j0:j1]
        dk_j.fill(0)
        dv_j.fill(0)
        for i0 in range(j0, T, block):  # the queries that see keys j0…
            i1 = min(i0 + block, T)
            bq, bk = i1 - i0, j1 - j0
            p = scratch("p", (B, n_head, bq, bk))
            dp = scratch("dp", (B, n_head, bq, bk))
            part_k = scratch("part_k", (B, n_head, bk, hs))
            part_q = scratch("part_q", (B, n_head, bq, hs))
            np.matmul(q[:, :, i0:i1], k_j.swapaxes(-1, -2), out=p)
            causal_mask(p, i0, j0)
            p -= lse[:, :, i0:i1, None]
            np.exp(p, out=p)  # the forward's probabilities, recomputed
            np.matmul(p.swapaxes(-1, -2), do[:, :, i0:i1], out=part_k)
            dv_j += part_k
            np.matmul(do[:, :, i0:i1], v_j.swapaxes(-1, -2), out=dp)
            dp -= d[:, :, i0:i1]
            dp *= p  # dS = P ∘ (dP − D)
            np.matmul(dp, k_j, out=part_q)
            dq[:, :, i0:i1] += part_q  # scaled once at the end
            np.matmul(dp.swapaxes(-1, -2), q[:, :, i0:i1], out=part_k)
            dk_j += part_k
    dq *= scale
    for grad, i in ((dq, 0), (dk, 1), (dv, 2)):
        dqkv.reshape(B, T, 3, n_head, hs)[:, :, i] = grad.transpose(0, 2, 1, 3)
