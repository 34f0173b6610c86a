"""Causal self-attention without the T x T matrix (FlashAttention-2's algorithm, in
NumPy): queries and keys in blocks, an online softmax in fp32, and only the output
and each row's logsumexp kept for the backward, which recomputes every block's
scores.  Blocks above the diagonal are skipped.  All (batch, head) pairs of a block
go through one batched matmul.

Shapes: qkv (B,T,3C) as c_attn writes it; out (B,T',C) for the T' = T − start
queries at positions start… (start > 0 when earlier keys and values are cached);
lse (B,NH,T').  Heads are strided views of those arrays: BLAS reads each head's
rows in place, so nothing is copied.  `heads_of` = (h0, h1) runs only those heads
(lse then holds only theirs): workers sharing a batch row split its heads.
"""
import numpy as np

from trainer.errors import knob

# queries and keys per block: one head's 128 x 128 fp32 scores (64 KB) stay in L2.
# COREGPT_ATTENTION_BLOCK shrinks it (the tests: T=32 then spans several blocks).
BLOCK = 128


def block_size():
    return knob("COREGPT_ATTENTION_BLOCK", BLOCK)


_scratch = {}


def scratch(name, shape, dtype=np.float32):
    """A buffer reused across calls (allocated once per name and shape)."""
    key = (name, shape, np.dtype(dtype))
    if key not in _scratch:
        _scratch[key] = np.empty(shape, dtype=dtype)
    return _scratch[key]


def heads(x, n_head, parts, heads_of=None):
    """(B,T,parts·C) -> `parts` views (B,NH,T,HS), no copy: each head's (T,HS) matrix
    has unit column stride, so BLAS reads it in place.  heads_of: only heads h0…h1."""
    B, T, width = x.shape
    h0, h1 = heads_of or (0, n_head)
    split = x.reshape(B, T, parts, n_head, width // parts // n_head)
    return [split[:, :, i, h0:h1].transpose(0, 2, 1, 3) for i in range(parts)]


_masks = {}


def causal_mask(scores, q0, k0):
    """Add -inf where key k0+c comes after query q0+r (in place, on a block)."""
    bq, bk = scores.shape[-2:]
    if k0 + bk - 1 <= q0:
        return
    key = (q0 - k0, bq, bk)
    if key not in _masks:
        after = np.arange(k0, k0 + bk)[None, :] > np.arange(q0, q0 + bq)[:, None]
        _masks[key] = np.where(after, np.float32(-np.inf), np.float32(0))
    scores += _masks[key]


def attention_forward(out, lse, qkv, n_head, start=0, block=None, heads_of=None):
    """qkv (B,T,3C) -> out (B,T−start,C), lse (B,NH,T−start) (NH: of heads_of)."""
    B, T, C3 = qkv.shape
    C, n, block = C3 // 3, T - start, block or block_size()
    hs = C // n_head
    scale = np.float32(1.0 / np.sqrt(hs))
    q, k, v = heads(qkv, n_head, 3, heads_of)
    (y,) = heads(out, n_head, 1, heads_of)
    n_head = q.shape[1]  # the heads run here
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        bq = i1 - i0
        q_i = q[:, :, start + i0:start + i1]
        m = scratch("m", (B, n_head, bq, 1))  # the running row max of the scores
        row = scratch("row", (B, n_head, bq, 1))
        l = scratch("l", (B, n_head, bq, 1))  # the running Σ exp(score − m)
        acc = scratch("acc", (B, n_head, bq, hs))  # the running Σ exp(score − m)·v
        pv = scratch("pv", (B, n_head, bq, hs))
        for j0 in range(0, start + i1, block):
            j1 = min(j0 + block, start + i1)
            s = scratch("s", (B, n_head, bq, j1 - j0))
            np.matmul(q_i, k[:, :, j0:j1].swapaxes(-1, -2), out=s)
            s *= scale
            causal_mask(s, start + i0, j0)
            if j0 == 0:  # the first key block: a plain softmax's first half
                np.max(s, axis=-1, keepdims=True, out=m)
                s -= m
                np.exp(s, out=s)
                np.sum(s, axis=-1, keepdims=True, out=l)
                np.matmul(s, v[:, :, j0:j1], out=acc)
                continue
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
        np.divide(acc, l, out=y[:, :, i0:i1])
        np.log(l, out=l)
        l += m
        lse[:, :, i0:i1] = l[..., 0]


def attention_backward(dqkv, dout, qkv, out, lse, n_head, block=None, heads_of=None):
    """dout (B,T,C) -> dqkv (B,T,3C) overwritten (heads_of's); out and lse as the
    forward left them."""
    B, T, C3 = qkv.shape
    C, block = C3 // 3, block or block_size()
    hs = C // n_head
    scale = np.float32(1.0 / np.sqrt(hs))
    q, k, v = heads(qkv, n_head, 3, heads_of)
    dq, dk, dv = heads(dqkv, n_head, 3, heads_of)
    (do,) = heads(dout, n_head, 1, heads_of)
    (o,) = heads(out, n_head, 1, heads_of)
    n_head = q.shape[1]  # the heads run here
    d = scratch("D", (B, n_head, T, 1))
    np.einsum("bhtd,bhtd->bht", do, o, out=d[..., 0])  # D = rowsum(dO ∘ O)
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        k_j, v_j = k[:, :, j0:j1], v[:, :, j0:j1]
        dk_j, dv_j = dk[:, :, j0:j1], dv[:, :, j0:j1]
        for i0 in range(j0, T, block):  # the queries that see keys j0…
            i1 = min(i0 + block, T)
            bq, bk = i1 - i0, j1 - j0
            p = scratch("p", (B, n_head, bq, bk))
            dp = scratch("dp", (B, n_head, bq, bk))
            np.matmul(q[:, :, i0:i1], k_j.swapaxes(-1, -2), out=p)
            p *= scale
            causal_mask(p, i0, j0)
            p -= lse[:, :, i0:i1, None]
            np.exp(p, out=p)  # the forward's probabilities, recomputed
            np.matmul(do[:, :, i0:i1], v_j.swapaxes(-1, -2), out=dp)
            dp -= d[:, :, i0:i1]
            dp *= p  # dS = P ∘ (dP − D); dQ and dK take the 1/√HS once, at the end
            # the first block to reach a gradient writes it, later ones add to it
            accumulate(dv_j, p.swapaxes(-1, -2), do[:, :, i0:i1], first=i0 == j0)
            accumulate(dq[:, :, i0:i1], dp, k_j, first=j0 == 0)
            accumulate(dk_j, dp.swapaxes(-1, -2), q[:, :, i0:i1], first=i0 == j0)
    dq *= scale
    dk *= scale


def accumulate(out, a, b, first):
    """out = a @ b if first, else out += a @ b."""
    if first:
        np.matmul(a, b, out=out)
    else:
        part = scratch("part", out.shape)
        np.matmul(a, b, out=part)
        out += part
