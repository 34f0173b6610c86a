"""Causal self-attention without the T x T matrix (FlashAttention-2's algorithm, in
NumPy over the GEMM engine): queries and keys in blocks, the softmax in fp32, and
only the output and each row's logsumexp kept for the backward, which recomputes
every block's scores.  Blocks above the diagonal are skipped.  The forward shifts
each query block by the max of its diagonal block, which it runs first, so every
other block's probabilities come straight out of one fused matmul, with no running
max and no rescaling; where that could overflow it reruns the block on the online
softmax (shifted_rows, online_rows).  All (batch, head)
pairs of a block go through one batched matmul (Engine.batched: one oneDNN primitive
where oneDNN is loaded); in bf16 its inputs are bf16 copies (q, k, v, the
probabilities, dO and dS) and it accumulates in fp32, like every other matmul.

A block's scores are kept transposed, keys x queries: the softmax then reduces and
broadcasts across rows, which NumPy runs on whole rows (along the contiguous axis
it would be row by row).

Shapes: qkv (B,T,3C) as the fused q, k, v projection writes it (with grouped-query
attention (B,T,(NH+2·NKV)·HS): NKV K/V heads each shared by NH/NKV query heads, whose
blocks repeat it); out (B,T',C) for the T' = T − start
queries at positions start… (start > 0 when earlier keys and values are cached);
lse (B,NH,T').  Each call first copies its heads' q, k, v (and dO) into dense
blocks of rows (bf16 in bf16), q and dO also transposed: oneDNN's AMX/brgemm
kernels take only dense operands, and run at twice the speed of its generic ones
on strided head views.  The backward fuses "− lse, exp" into the scores' matmul and
"− D, ∘ P" into dP's (Engine.batched's post-ops; their operands spread dense along
the keys, which oneDNN needs too), and writes dS in bf16 straight from its matmul.
`work` (a Workspace) is the engine and the buffers a process's attention reuses.
`heads_of` = (h0, h1) runs only those heads (lse then holds only theirs): workers
sharing a batch row split its heads.

Packed examples (chat data): `starts` (T,) gives each query's first key, the first
token of its example (one batch row at a time).  A query block skips every key
block that ends before its first query's example begins, and the blocks that
straddle a boundary add a mask of it to the causal one.
"""
import numpy as np

from trainer.errors import knob

# queries and keys per block: one head's 128 x 128 fp32 scores (64 KB) stay in L2.
# COREGPT_ATTENTION_BLOCK shrinks it (the tests: T=32 then spans several blocks).
BLOCK = 128


def block_size():
    return knob("COREGPT_ATTENTION_BLOCK", BLOCK)


class Workspace:
    """What attention runs with: the GEMM engine, and the buffers and causal masks it
    reuses across calls (each made once per name and shape)."""

    def __init__(self, engine):
        self.engine = engine
        self.buffers, self.masks = {}, {}

    def scratch(self, name, shape, dtype=np.float32):
        key = (name, shape, np.dtype(dtype))
        if key not in self.buffers:
            self.buffers[key] = np.empty(shape, dtype=dtype)
        return self.buffers[key]


def heads(x, n_head, parts, heads_of=None):
    """(B,T,parts·C) -> `parts` views (B,NH,T,HS), no copy: each head's (T,HS) matrix
    has unit column stride, so BLAS reads it in place.  heads_of: only heads h0…h1."""
    B, T, width = x.shape
    h0, h1 = heads_of or (0, n_head)
    split = x.reshape(B, T, parts, n_head, width // parts // n_head)
    return [split[:, :, i, h0:h1].transpose(0, 2, 1, 3) for i in range(parts)]


def qkv_heads(qkv, n_head, n_kv_head, heads_of=None):
    """qkv (B,T,(NH+2·NKV)·HS), the query heads then the key and the value heads ->
    views q (B,NH',T,HS) of heads_of's query heads and k, v (B,NKV',T,HS) of the K/V
    heads they read: query head h reads K/V head h // (NH/NKV) (grouped-query
    attention; NKV = NH is GPT-2's, where this is heads(qkv, NH, 3))."""
    B, T, width = qkv.shape
    group, hs = n_head // n_kv_head, width // (n_head + 2 * n_kv_head)
    h0, h1 = heads_of or (0, n_head)
    if h0 % group or h1 % group:
        raise ValueError(f"query heads {h0}…{h1 - 1} split a group of {group} sharing a K/V head")
    q = qkv[..., :n_head * hs].reshape(B, T, n_head, hs)[:, :, h0:h1].transpose(0, 2, 1, 3)
    kv = qkv[..., n_head * hs:].reshape(B, T, 2, n_kv_head, hs)[:, :, :, h0 // group:h1 // group]
    return q, kv[:, :, 0].transpose(0, 2, 1, 3), kv[:, :, 1].transpose(0, 2, 1, 3)


def low(work, name, x):
    """x as the attention matmuls read it: in bf16 a scratch bf16 copy (x contiguous)."""
    engine = work.engine
    if not engine.low:
        return x
    copy = work.scratch(name, x.shape, engine.low_dtype)
    engine.to_low(copy, x)
    return copy


def in_blocks(work, name, view, block, transposed=False, group=1):
    """view (B,NH,T,HS) copied into blocks of `block` rows, each dense (B,NH,rows,HS)
    (bf16 in bf16) -> the list of blocks, and with transposed also the list of their
    transposes (B,NH,HS,rows).  oneDNN runs a batched matmul on its AMX/brgemm kernels
    only when every operand is dense; on views of (B,T,3C) rows it takes a generic
    kernel at half the speed.  NumPy's engine in fp32 (the sampler's) reads views.
    group > 1: each head repeated `group` times, once for each query head that reads it."""
    engine, rows, flipped = work.engine, [], []
    for i0 in range(0, view.shape[2], block):
        src = view[:, :, i0:i0 + block]
        if group > 1:
            rows.append(repeated(work, (name, i0), src, group))
            continue
        if not engine.low and engine.primitives is None:
            rows.append(src)
            flipped.append(src.swapaxes(-1, -2))
            continue
        copy = work.scratch((name, i0), src.shape, engine.low_dtype)
        engine.to_low(copy, src) if engine.low else np.copyto(copy, src)
        rows.append(copy)
        if transposed:
            flipped.append(work.scratch((name, i0, "T"), src.shape[:2] + src.shape[:1:-1], engine.low_dtype))
            np.copyto(bits(flipped[-1]), bits(copy.swapaxes(-1, -2)))
    return (rows, flipped) if transposed else rows


def repeated(work, name, src, group):
    """src (B,NKV,rows,HS) -> a dense (B,NKV·group,rows,HS) copy with each head `group`
    times over (bf16 in bf16): the K/V heads as the query heads of their groups read them."""
    engine = work.engine
    B, n_kv, n, hs = src.shape
    copy = work.scratch(name, (B, n_kv, group, n, hs), engine.low_dtype)
    if engine.low:
        once = work.scratch((name, "once"), src.shape, engine.low_dtype)
        engine.to_low(once, src)
        np.copyto(bits(copy), bits(once)[:, :, None])
    else:
        np.copyto(copy, src[:, :, None])
    return copy.reshape(B, n_kv * group, n, hs)


def bits(x):
    """bf16 arrays copied as their 16-bit patterns (NumPy copies its own dtypes faster)."""
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x


def along_keys(work, name, values, keys):
    """(B,NH,1,bq) -> a dense (B,NH,keys,bq) copy of every row: oneDNN's matmul fuses an
    element-wise operand at speed only when it is dense (broadcast ones run its
    reference code)."""
    rows = work.scratch(name, values.shape[:2] + (keys, values.shape[-1]))
    np.copyto(rows, values)
    return rows


def causal_mask(work, bk, bq, q0, k0):
    """-> the (1,1,bk,bq) block of -inf where key k0+r comes after query q0+c (keys x
    queries), or None where no key of the block does."""
    if k0 + bk - 1 <= q0:
        return None
    key = (q0 - k0, bk, bq)
    if key not in work.masks:
        after = np.arange(k0, k0 + bk)[:, None] > np.arange(q0, q0 + bq)[None, :]
        work.masks[key] = np.where(after, np.float32(-np.inf), np.float32(0))[None, None]
    return work.masks[key]


def masked(work, bk, bq, q0, k0, doc=None):
    """The post-op that adds the mask of a block: causal (none off the diagonal),
    and where doc (the first key of each of its queries) cuts into it, the keys
    before each query's example too."""
    if doc is None or k0 >= doc[-1]:
        mask = causal_mask(work, bk, bq, q0, k0)
    else:
        mask = work.scratch("document mask", (1, 1, bk, bq))
        keys = np.arange(k0, k0 + bk)[:, None]
        hidden = (keys > np.arange(q0, q0 + bq)[None, :]) | (keys < doc[None, :])
        np.copyto(mask[0, 0], np.where(hidden, np.float32(-np.inf), np.float32(0)))
    return [] if mask is None else [("add", mask)]


def first_key_block(doc, block):
    """The first key block queries see whose first keys are doc (None: causal, every block)."""
    return 0 if doc is None else doc[0] // block


# shifted_rows' sums of exp(score − m) must stay below this, else its query block reruns
# on the online softmax: far below fp32's overflow (3.4e38), so Σ p·v stays finite too
# for any |v| < 1e19
SUM_LIMIT = np.float32(2.0 ** 64)


def attention_forward(work, out, lse, qkv, n_head, start=0, block=None, heads_of=None, n_kv_head=None,
                      starts=None):
    """qkv (B,T,(NH+2·NKV)·HS) -> out (B,T−start,NH·HS), lse (B,NH,T−start) (NH: of
    heads_of); NKV = n_kv_head K/V heads (default NH); starts: packed examples'
    (see above; B = 1, start = 0).  Each query block runs shifted_rows, and
    online_rows where that could overflow."""
    B, T, width = qkv.shape
    n_kv_head = n_kv_head or n_head
    n, block, group = T - start, block or block_size(), n_head // n_kv_head
    hs = width // (n_head + 2 * n_kv_head)
    scale = np.float32(1.0 / np.sqrt(hs))
    q, k, v = qkv_heads(qkv, n_head, n_kv_head, heads_of)
    (y,) = heads(out, n_head, 1, heads_of)
    n_head = q.shape[1]  # the heads run here
    _, q_cols = in_blocks(work, "q", q[:, :, start:], block, transposed=True)
    k_rows, v_rows = in_blocks(work, "k", k, block, group=group), in_blocks(work, "v", v, block, group=group)
    for i0, q_t in zip(range(0, n, block), q_cols):
        i1 = min(i0 + block, n)
        bq = i1 - i0
        m = work.scratch("m", (B, n_head, 1, bq))  # each query's shift: its scores' max
        l = work.scratch("l", (B, n_head, 1, bq))  # Σ exp(score − m)
        acc = work.scratch("acc", (B, n_head, bq, hs))  # Σ exp(score − m)·v
        # the keys these queries see, by block: (first position, keys, values); the
        # last block is short in the sampler's cache
        doc = None if starts is None else starts[i0:i1]
        key_blocks = [(j0, k_rows[j][:, :, :start + i1 - j0], v_rows[j][:, :, :start + i1 - j0])
                      for j, j0 in enumerate(range(0, start + i1, block)) if j >= first_key_block(doc, block)]
        args = (m, l, acc, q_t, key_blocks, start + i0, scale, doc)
        if not shifted_rows(work, *args):
            # with examples, the diagonal first: it holds a key of every query
            online_rows(work, *args[:4], key_blocks if doc is None else key_blocks[-1:] + key_blocks[:-1],
                        *args[5:])
        acc /= l.swapaxes(-1, -2)
        y[:, :, i0:i1] = acc
        np.log(l, out=l)
        l += m
        lse[:, :, i0:i1] = l[:, :, 0]


def block_scores(work, q_t, k_j, q0, k0, scale, doc):
    """-> the scratch (B,NH,bk,bq) scores of keys k0… x queries q0…, scaled and masked."""
    s = work.scratch("s", k_j.shape[:3] + q_t.shape[-1:])
    work.engine.batched(s, k_j, q_t, scale=scale, post=masked(work, s.shape[2], s.shape[3], q0, k0, doc))
    return s


def softmax_start(work, m, l, acc, s, v_j):
    """The first block of a plain softmax, m its scores' max: s = exp(s − m), l = Σ s, acc = sᵀv."""
    s -= m
    np.exp(s, out=s)
    np.sum(s, axis=-2, keepdims=True, out=l)
    work.engine.batched(acc, low(work, "p", s).swapaxes(-1, -2), v_j)


def shifted_rows(work, m, l, acc, q_t, key_blocks, q0, scale, doc):
    """One query block, its last key block (the diagonal) first: that block's max m then
    shifts every other block, whose probabilities exp(score − m) come straight out of
    the scores' matmul (fused post-ops, written in bf16 where the engine can), with no
    running max and no rescaling: the same softmax while every Σ exp(score − m) stays
    below SUM_LIMIT, which it checks -> False (m, l, acc undefined) where a query has no
    key in the last block (the sampler's queries off the block grid) or a sum reached
    SUM_LIMIT (a score ~44 above the diagonal's max)."""
    engine = work.engine
    k0, k_last, v_last = key_blocks[-1]
    s = block_scores(work, q_t, k_last, q0, k0, scale, doc)
    np.max(s, axis=-2, keepdims=True, out=m)
    if np.isneginf(m).any():
        return False
    softmax_start(work, m, l, acc, s, v_last)
    if len(key_blocks) > 1:  # the others: whole blocks, every key before every query
        bk = key_blocks[0][1].shape[2]
        m_rows = along_keys(work, "m rows", m, bk)
        ones = work.scratch("ones", (1, 1, 1, bk), engine.low_dtype)
        ones[...] = 1
        p = work.scratch("p shifted", m_rows.shape, engine.low_dtype if engine.writes_low else np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # what the check below catches
        for j0, k_j, v_j in key_blocks[:-1]:
            engine.batched(p, k_j, q_t, scale=scale,
                           post=masked(work, bk, q_t.shape[-1], q0, j0, doc) + [("sub", m_rows), ("exp", None)])
            p_low = p if engine.writes_low else low(work, "p", p)
            engine.batched(acc, p_low.swapaxes(-1, -2), v_j, accumulate=True)
            engine.batched(l, ones, p_low, accumulate=True)  # l += Σ over keys of p as the matmul weighed it
    return bool((l < SUM_LIMIT).all())  # also False for inf and NaN


def online_rows(work, m, l, acc, q_t, key_blocks, q0, scale, doc):
    """One query block by the online softmax (FlashAttention-2's): key blocks in the
    order given, a running max m, and what was summed rescaled whenever the max grows."""
    row = work.scratch("row", m.shape)
    for n, (j0, k_j, v_j) in enumerate(key_blocks):
        s = block_scores(work, q_t, k_j, q0, j0, scale, doc)
        if n == 0:
            np.max(s, axis=-2, keepdims=True, out=m)
            softmax_start(work, m, l, acc, s, v_j)
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
        work.engine.batched(acc, low(work, "p", s).swapaxes(-1, -2), v_j, accumulate=True)
        m[...] = row


def attention_backward(work, dqkv, dout, qkv, out, lse, n_head, block=None, heads_of=None, n_kv_head=None,
                       starts=None):
    """dout (B,T,NH·HS) -> dqkv, shaped as qkv, overwritten (heads_of's, and the K/V
    heads they read: a K/V head's gradient sums its group's); out and lse as the
    forward left them; starts as the forward's.  Query blocks outer: each block's
    lse and D are spread along the keys once, for every key block it sees."""
    B, T, width = qkv.shape
    n_kv_head = n_kv_head or n_head
    block, heads_all, group = block or block_size(), n_head, n_head // n_kv_head
    hs = width // (n_head + 2 * n_kv_head)
    scale = np.float32(1.0 / np.sqrt(hs))
    engine = work.engine
    q, k, v = qkv_heads(qkv, n_head, n_kv_head, heads_of)
    (do,), (o,) = heads(dout, n_head, 1, heads_of), heads(out, n_head, 1, heads_of)
    n_head = q.shape[1]  # the heads run here
    d = work.scratch("D", (B, n_head, 1, T))
    np.einsum("bhtd,bhtd->bht", do, o, out=d[:, :, 0])  # D = rowsum(dO ∘ O)
    (q_rows, q_cols), (do_rows, do_cols) = in_blocks(work, "q", q, block, True), in_blocks(work, "dO", do, block, True)
    k_rows, v_rows = in_blocks(work, "k", k, block, group=group), in_blocks(work, "v", v, block, group=group)
    # dq, dk, dv in dense blocks too (dk, dv of every query head), copied into dqkv at the end
    dq, dk, dv = ([work.scratch((name, j0), x.shape) for j0, x in zip(range(0, T, block), k_rows)]
                  for name in ("dq", "dk", "dv"))
    ds_dtype = engine.low_dtype if engine.writes_low else np.float32  # dS straight out of its matmul
    for i, i0 in enumerate(range(0, T, block)):
        i1 = min(i0 + block, T)
        bq = i1 - i0
        doc = None if starts is None else starts[i0:i1]
        first = first_key_block(doc, block)
        for j, j0 in enumerate(range(0, i1, block)):  # the keys queries i0… see
            if j < first:
                continue
            bk = min(block, i1 - j0)
            if j == first or bk < block:
                lse_rows = along_keys(work, "lse rows", lse[:, :, None, i0:i1], bk)
                d_rows = along_keys(work, "D rows", d[..., i0:i1], bk)
            p = work.scratch("p", (B, n_head, bk, bq))  # keys x queries, as in the forward
            # the forward's probabilities, recomputed: exp(score − lse)
            engine.batched(p, k_rows[j], q_cols[i], scale=scale,
                           post=masked(work, bk, bq, i0, j0, doc) + [("sub", lse_rows), ("exp", None)])
            ds = work.scratch("ds", (B, n_head, bk, bq), ds_dtype)
            # dS = P ∘ (dP − D); dQ and dK take the 1/√HS once, at the end
            engine.batched(ds, v_rows[j], do_cols[i], post=[("sub", d_rows), ("mul", p)])
            p_low, ds_low = low(work, "p", p), ds if engine.writes_low else low(work, "ds", ds)
            # the first block to reach a gradient writes it, later ones add to it
            engine.batched(dv[j], p_low, do_rows[i], accumulate=i > j)
            engine.batched(dk[j], ds_low, q_rows[i], accumulate=i > j)
            engine.batched(dq[i], ds_low.swapaxes(-1, -2), k_rows[j], accumulate=j > first)
    into = qkv_heads(dqkv, heads_all, n_kv_head, heads_of)
    for i0, dq_i, dk_i, dv_i in zip(range(0, T, block), dq, dk, dv):
        i1 = i0 + dq_i.shape[2]
        np.multiply(dq_i, scale, out=into[0][:, :, i0:i1])
        if group > 1:  # each K/V head: the sum over the query heads of its group
            dk_i, dv_i = (group_sum(work, name, x, group) for name, x in (("dk sum", dk_i), ("dv sum", dv_i)))
        np.multiply(dk_i, scale, out=into[1][:, :, i0:i1])
        np.copyto(into[2][:, :, i0:i1], dv_i)


def group_sum(work, name, x, group):
    """x (B,NKV·group,rows,HS) -> (B,NKV,rows,HS) scratch: each group of heads summed."""
    B, heads_run, *rest = x.shape
    total = work.scratch(name, (B, heads_run // group, *rest))
    np.sum(x.reshape(B, heads_run // group, group, *rest), axis=2, out=total)
    return total
