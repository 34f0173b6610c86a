"""Causal self-attention without the T x T matrix (FlashAttention-2's algorithm, in
NumPy over the GEMM engine): queries and keys in blocks, an online softmax in fp32,
and only the output and each row's logsumexp kept for the backward, which recomputes
every block's scores.  Blocks above the diagonal are skipped.  All (batch, head)
pairs of a block go through one batched matmul (gemm.batched: one oneDNN primitive
where oneDNN is loaded); in bf16 its inputs are bf16 copies (q, k, v, the
probabilities, dO and dS) and it accumulates in fp32, like every other matmul.

A block's scores are kept transposed, keys x queries: the softmax then reduces and
broadcasts across rows, which NumPy runs on whole rows (along the contiguous axis
it would be row by row).

Shapes: qkv (B,T,3C) as c_attn writes it; out (B,T',C) for the T' = T − start
queries at positions start… (start > 0 when earlier keys and values are cached);
lse (B,NH,T').  Heads are strided views of those arrays: the matmuls read each
head's rows in place.  `heads_of` = (h0, h1) runs only those heads (lse then holds
only theirs): workers sharing a batch row split its heads.
"""
import numpy as np

from trainer import gemm
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


def low(name, x):
    """x as the attention matmuls read it: in bf16 a scratch bf16 copy (x contiguous)."""
    engine = gemm.engine()
    if not engine.low:
        return x
    copy = scratch(name, x.shape, engine.low_dtype)
    gemm.to_low(copy, x)
    return copy


_masks = {}


def causal_mask(scores, q0, k0):
    """Add -inf where key k0+r comes after query q0+c (in place, on a keys x queries block)."""
    bk, bq = scores.shape[-2:]
    if k0 + bk - 1 <= q0:
        return
    key = (q0 - k0, bk, bq)
    if key not in _masks:
        after = np.arange(k0, k0 + bk)[:, None] > np.arange(q0, q0 + bq)[None, :]
        _masks[key] = np.where(after, np.float32(-np.inf), np.float32(0))
    scores += _masks[key]


def attention_forward(out, lse, qkv, n_head, start=0, block=None, heads_of=None):
    """qkv (B,T,3C) -> out (B,T−start,C), lse (B,NH,T−start) (NH: of heads_of)."""
    B, T, C3 = qkv.shape
    C, n, block = C3 // 3, T - start, block or block_size()
    hs = C // n_head
    scale = np.float32(1.0 / np.sqrt(hs))
    q, k, v = heads(low("qkv", qkv), n_head, 3, heads_of)
    (y,) = heads(out, n_head, 1, heads_of)
    n_head = q.shape[1]  # the heads run here
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        bq = i1 - i0
        q_t = q[:, :, start + i0:start + i1].swapaxes(-1, -2)
        m = scratch("m", (B, n_head, 1, bq))  # the running max of each query's scores
        row = scratch("row", (B, n_head, 1, bq))
        l = scratch("l", (B, n_head, 1, bq))  # the running Σ exp(score − m)
        acc = scratch("acc", (B, n_head, bq, hs))  # the running Σ exp(score − m)·v
        for j0 in range(0, start + i1, block):
            j1 = min(j0 + block, start + i1)
            s = scratch("s", (B, n_head, j1 - j0, bq))  # keys x queries
            gemm.batched(s, k[:, :, j0:j1], q_t, scale=scale)
            causal_mask(s, start + i0, j0)
            if j0 == 0:  # the first key block: a plain softmax's first half
                np.max(s, axis=-2, keepdims=True, out=m)
                s -= m
                np.exp(s, out=s)
                np.sum(s, axis=-2, keepdims=True, out=l)
                gemm.batched(acc, low("p", s).swapaxes(-1, -2), v[:, :, j0:j1])
                continue
            np.max(s, axis=-2, keepdims=True, out=row)
            np.maximum(row, m, out=row)  # the new running max
            s -= row
            np.exp(s, out=s)
            np.subtract(m, row, out=m)
            np.exp(m, out=m)  # exp(old max − new max): rescales what was summed so far
            l *= m
            acc *= m.swapaxes(-1, -2)
            l += np.sum(s, axis=-2, keepdims=True, out=m)
            gemm.batched(acc, low("p", s).swapaxes(-1, -2), v[:, :, j0:j1], accumulate=True)
            m[...] = row
        np.divide(acc, l.swapaxes(-1, -2), out=y[:, :, i0:i1])
        np.log(l, out=l)
        l += m
        lse[:, :, i0:i1] = l[:, :, 0]


def attention_backward(dqkv, dout, qkv, out, lse, n_head, block=None, heads_of=None):
    """dout (B,T,C) -> dqkv (B,T,3C) overwritten (heads_of's); out and lse as the
    forward left them."""
    B, T, C3 = qkv.shape
    C, block = C3 // 3, block or block_size()
    hs = C // n_head
    scale = np.float32(1.0 / np.sqrt(hs))
    q, k, v = heads(low("qkv", qkv), n_head, 3, heads_of)
    dq, dk, dv = heads(dqkv, n_head, 3, heads_of)
    (do,) = heads(low("dout", dout), n_head, 1, heads_of)
    (do_fp32,) = heads(dout, n_head, 1, heads_of)
    (o,) = heads(out, n_head, 1, heads_of)
    n_head = q.shape[1]  # the heads run here
    d = scratch("D", (B, n_head, 1, T))
    np.einsum("bhtd,bhtd->bht", do_fp32, o, out=d[:, :, 0])  # D = rowsum(dO ∘ O)
    lse = lse[:, :, None, :]
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        k_j, v_j = k[:, :, j0:j1], v[:, :, j0:j1]
        dk_j, dv_j = dk[:, :, j0:j1], dv[:, :, j0:j1]
        for i0 in range(j0, T, block):  # the queries that see keys j0…
            i1 = min(i0 + block, T)
            bq, bk = i1 - i0, j1 - j0
            p = scratch("p", (B, n_head, bk, bq))  # keys x queries, as in the forward
            ds = scratch("ds", (B, n_head, bk, bq))
            gemm.batched(p, k_j, q[:, :, i0:i1].swapaxes(-1, -2), scale=scale)
            causal_mask(p, i0, j0)
            p -= lse[..., i0:i1]
            np.exp(p, out=p)  # the forward's probabilities, recomputed
            gemm.batched(ds, v_j, do[:, :, i0:i1].swapaxes(-1, -2))
            ds -= d[..., i0:i1]
            ds *= p  # dS = P ∘ (dP − D); dQ and dK take the 1/√HS once, at the end
            p_low, ds_low = low("p", p), low("ds", ds)
            # the first block to reach a gradient writes it, later ones add to it
            gemm.batched(dv_j, p_low, do[:, :, i0:i1], accumulate=i0 > j0)
            gemm.batched(dk_j, ds_low, q[:, :, i0:i1], accumulate=i0 > j0)
            gemm.batched(dq[:, :, i0:i1], ds_low.swapaxes(-1, -2), k_j, accumulate=j0 > 0)
    dq *= scale
    dk *= scale
