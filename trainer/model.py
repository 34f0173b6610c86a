"""GPT-2's layers in NumPy float32, one *_forward/*_backward pair per layer
(and a *_weights_backward where the layer has weights: its weight gradients are
a separate pass, see the model family's model.py).

Shapes: B rows, T positions, C channels, NH heads of HS = C/NH, V vocabulary,
N = B·T.  Every function writes into buffers it is given (`out=`): the caller
owns the memory, so a training step allocates nothing large.  The layers that
multiply take the GEMM engine first (trainer.gemm.Engine: NumPy or oneDNN, fp32 or
bf16 inputs); `Layers(engine)` is every layer with it bound, which is what a model
calls.  Attention, blocked and without the T x T matrix, has its own module.
"""
from functools import partial
from typing import NamedTuple

import numpy as np

from trainer import attention, llama_layers
from trainer.llama_layers import norm_input_gradient

LN_EPS = np.float32(1e-5)
GELU_S = np.float32(np.sqrt(2.0 / np.pi))
GELU_K = np.float32(0.044715)


def position_runs(first, T, n, at=None):
    """-> [(lo, hi, position of row lo)] of the runs of rows first…first+n whose
    positions count up by one: row mod T, or `at` (n,), each row's own (chat data's)."""
    if at is None:
        cuts = [0] + list(range(-first % T or T, n, T))
        return [(lo, hi, (first + lo) % T) for lo, hi in zip(cuts, cuts[1:] + [n])]
    cuts = [0] + list(np.flatnonzero(at[1:] != at[:-1] + 1) + 1)
    return [(lo, hi, int(at[lo])) for lo, hi in zip(cuts, cuts[1:] + [n])]


def encoder_forward(out, idx, tokens, positions, first, T, at=None):
    """idx (n,) int, the token rows first…first+n of rows of T -> out (n,C) =
    tokens[idx] + positions[position], position = row mod T or at's (tokens: the
    token embedding (V,C), positions: the learned position embedding)"""
    np.take(tokens, idx, axis=0, out=out)
    for lo, hi, pos in position_runs(first, T, idx.size, at):
        out[lo:hi] += positions[pos:pos + hi - lo]


def encoder_backward(dtokens, dpositions, dout, idx, vocab_lo=0, at=None):
    """dout (B,T,C) -> adds each row into the dtokens row of its token, for the tokens in
    dtokens's slice of the vocabulary (ids vocab_lo…); dtokens accumulates (the lm head
    wrote it first).  dpositions, when given, is overwritten (at: (B,T) positions)."""
    if dpositions is not None and at is None:
        T = idx.shape[1]
        np.sum(dout, axis=0, out=dpositions[:T])
        dpositions[T:] = 0
    elif dpositions is not None:
        dpositions[...] = 0
        rows = dout.reshape(-1, dout.shape[-1])
        for lo, hi, pos in position_runs(0, 0, rows.shape[0], at.reshape(-1)):
            dpositions[pos:pos + hi - lo] += rows[lo:hi]
    ids, rows = idx.reshape(-1), dout.reshape(-1, dout.shape[-1])
    if vocab_lo == 0 and dtokens.shape[0] > ids.max():
        np.add.at(dtokens, ids, rows)
    else:
        mine = (ids >= vocab_lo) & (ids < vocab_lo + dtokens.shape[0])
        np.add.at(dtokens, ids[mine] - vocab_lo, rows[mine])


def layernorm_forward(out, mean, rstd, x, w, b):
    """x (N,C) -> out (N,C); saves mean (N,1), rstd (N,1)."""
    np.mean(x, axis=1, keepdims=True, out=mean)
    np.subtract(x, mean, out=out)
    np.einsum("nc,nc->n", out, out, out=rstd[:, 0])
    rstd /= np.float32(x.shape[1])
    rstd += LN_EPS
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    out *= rstd
    out *= w
    out += b


def layernorm_backward(dx, dres, dout, x, mean, rstd, w, norm, dnorm, rowtmp):
    """dout (N,C) -> dx (N,C) = dres + ∂/∂x (dres None: 0); dout is kept for
    layernorm_weights_backward.  norm, dnorm (N,C) and rowtmp (N,1) are scratch."""
    np.subtract(x, mean, out=norm)
    norm *= rstd
    np.multiply(dout, w, out=dnorm)
    # dx = rstd · (dnorm − mean(dnorm) − norm · mean(dnorm · norm))
    np.einsum("nc,nc->n", dnorm, norm, out=rowtmp[:, 0])
    rowtmp /= np.float32(x.shape[1])
    norm *= rowtmp
    np.mean(dnorm, axis=1, keepdims=True, out=rowtmp)
    dnorm -= rowtmp
    norm_input_gradient(dx, dres, dnorm, norm, rstd)


def layernorm_weights_backward(dw, db, dout, x, mean, rstd, norm):
    """dout, x (N,C) -> dw, db (C) overwritten; norm (N,C) scratch."""
    np.subtract(x, mean, out=norm)
    norm *= rstd
    norm *= dout
    np.sum(norm, axis=0, out=dw)
    np.sum(dout, axis=0, out=db)


def matmul_forward(engine, out, inp, w, b=None):
    """out (N,OC) = inp (N,C) @ w (C,OC) + b (OC); a pool adds b later, on rows."""
    engine.matmul(out, inp, w)
    if b is not None:
        out += b


def matmul_backward(engine, dinp, dout, w):
    """dout (N,OC) -> dinp (N,C) = dout @ w.T, overwritten."""
    engine.matmul(dinp, dout, w.T)


def matmul_weights_backward(engine, dw, dout, inp):
    """dout (N,OC), inp (N,C) -> dw (C,OC) = inp.T @ dout, overwritten."""
    engine.matmul(dw, inp.T, dout)


# LoRA beside a frozen linear layer (trainer/lora.py): out += s · x A^T B^T, s = alpha / r.
# u = s · x A^T and du = s · dout B carry the scale, so the weight gradients need none.
def lora_down_forward(engine, u, x, a, scale):
    """x (n,in), A (r,in) -> u (n,r) = s · x @ A.T, overwritten."""
    engine.matmul(u, x, a.T)
    u *= np.float32(scale)


def lora_up_forward(engine, out, u, b):
    """u (n,r), B (out,r) -> out (n,out) += u @ B.T (the frozen layer's x @ W is in out)."""
    engine.matmul(out, u, b.T, accumulate=True)


def lora_up_backward(engine, du, dout, b, scale):
    """dout (n,out) -> du (n,r) = s · dout @ B, overwritten."""
    engine.matmul(du, dout, b)
    du *= np.float32(scale)


def lora_down_backward(engine, dx, du, a):
    """du (n,r) -> dx (n,in) += du @ A (the frozen layer's dout @ W.T is in dx)."""
    engine.matmul(dx, du, a, accumulate=True)


def lora_down_backward_dropped(engine, dx, du, a, mask, tmp):
    """As lora_down_backward, through dropout: dx += (du @ A) · mask; tmp (n,in) scratch."""
    engine.matmul(tmp, du, a)
    tmp *= mask
    dx += tmp


def lora_weights_backward(engine, da, db, du, dout, u, x):
    """du (N,r), dout (N,out), u (N,r), x (N,in) -> dA (r,in) = du.T @ x and
    dB (out,r) = dout.T @ u, overwritten."""
    engine.matmul(da, du.T, x)
    engine.matmul(db, dout.T, u)


def bias_backward(db, dout):
    """dout (N,OC) -> db (OC) = Σ over rows, overwritten (from fp32 dout in every precision)."""
    np.sum(dout, axis=0, out=db)


def lmhead_forward(engine, logits, x, embedding):
    """x (N,C) -> logits (N,V) = x @ embedding.T: the head is tied to the token embedding."""
    engine.matmul(logits, x, embedding.T)


def lmhead_backward(engine, dx, dlogits, embedding):
    """dlogits (N,V) -> dx (N,C) = dlogits @ embedding, overwritten."""
    engine.matmul(dx, dlogits, embedding)


def lmhead_weights_backward(engine, dembedding, dlogits, x, accumulate=False):
    """dlogits (N,V'), x (N,C) -> dembedding (V',C) = dlogits.T @ x, overwritten (or added to,
    for a later chunk of rows); V' may be a slice of the vocabulary (then dlogits is
    the matching column slice)."""
    engine.matmul(dembedding, dlogits.T, x, accumulate)


# causal self-attention, blocked, without the T x T matrix (see attention.py)
attention_forward, attention_backward = attention.attention_forward, attention.attention_backward


def gelu_tanh(out, x):
    """out = tanh(√(2/π)(x + 0.044715x³)), the tanh of GELU's approximation"""
    np.multiply(x, x, out=out)
    out *= x
    out *= GELU_K
    out += x
    out *= GELU_S
    np.tanh(out, out=out)


def gelu_forward(engine, out, x):
    """tanh-approximate GELU: out = ½x(1 + tanh(√(2/π)(x + 0.044715x³))); by oneDNN
    where the engine loaded it (one pass), else NumPy's passes below"""
    if engine.gelu(out, x):
        return
    gelu_tanh(out, x)
    out += 1
    out *= x
    out *= np.float32(0.5)


def gelu_backward(engine, dout, x, th, slope):
    """dout (N,4C) *= GELU'(x) in place; th, slope (N,4C) scratch.
    GELU' = (1 + th)(½ + ½·s·x(1 + 3k·x²)(1 − th)), th = tanh(s(x + k·x³))"""
    if engine.gelu(dout, x, backward=True):
        return
    gelu_tanh(th, x)
    np.multiply(x, x, out=slope)
    slope *= np.float32(3) * GELU_K
    slope += 1
    slope *= GELU_S
    slope *= x
    slope *= np.float32(0.5)
    np.subtract(np.float32(1), th, out=th)  # 1 - th
    slope *= th
    slope += np.float32(0.5)
    np.subtract(np.float32(2), th, out=th)  # 1 + th
    slope *= th
    dout *= slope


CE_ROWS = 8  # rows of logits whose softmax passes run together: 8 x 50257 fp32 stay in L2


def crossentropy_forward(logits, targets, rowtmp, rows, counted=None):
    """logits (N,V) -> softmax probabilities in place; returns Σ −log p[target]
    as a Python float (accumulated in float64), over the rows `counted` (N,) bool
    holds (None: all).  A few rows at a time, so the five passes over them read
    the cache, not memory (each row's values are the same)."""
    total = 0.0
    for b0 in range(0, logits.shape[0], CE_ROWS):
        b1 = min(b0 + CE_ROWS, logits.shape[0])
        x, tmp = logits[b0:b1], rowtmp[b0:b1]
        np.max(x, axis=1, keepdims=True, out=tmp)
        x -= tmp
        target_logit = x[rows[:b1 - b0], targets[b0:b1]]  # the one small gather
        np.exp(x, out=x)
        np.sum(x, axis=1, keepdims=True, out=tmp)
        x /= tmp
        lse = tmp[:, 0]
        if counted is not None:
            lse, target_logit = lse[counted[b0:b1]], target_logit[counted[b0:b1]]
        total += float(np.sum(np.log(lse), dtype=np.float64) - np.sum(target_logit, dtype=np.float64))
    return total


def crossentropy_backward(probs, targets, rows, scale, counted=None):
    """probs (N,V) -> dlogits = (probs − onehot(targets)) · scale, in place; zero on
    the rows `counted` leaves out."""
    probs[rows, targets] -= 1
    probs *= np.float32(scale)
    if counted is not None:
        probs[~counted] = 0


# the layers that multiply, which take the engine first (attention: its Workspace)
ENGINE_LAYERS = ("matmul_forward", "matmul_backward", "matmul_weights_backward", "lora_down_forward",
                 "lora_up_forward", "lora_up_backward", "lora_down_backward", "lora_down_backward_dropped",
                 "lora_weights_backward", "lmhead_forward", "lmhead_backward", "lmhead_weights_backward",
                 "gelu_forward", "gelu_backward")
PLAIN_LAYERS = ("encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
                "layernorm_weights_backward", "bias_backward", "crossentropy_forward", "crossentropy_backward")


class Layers:
    """Every layer of this module and of trainer/llama_layers.py, with the GEMM engine
    it multiplies on bound (and attention with a Workspace of its own): what a model
    calls as `nn.layer(...)`."""

    def __init__(self, engine):
        self.engine = engine
        self.attention = attention.Workspace(engine)
        for module, plain, multiplying in ((globals(), PLAIN_LAYERS, ENGINE_LAYERS),
                                           (vars(llama_layers), llama_layers.PLAIN_LAYERS, llama_layers.ENGINE_LAYERS)):
            for name in plain:
                setattr(self, name, module[name])
            for name in multiplying:
                setattr(self, name, partial(module[name], engine))
        self.attention_forward = partial(attention.attention_forward, self.attention)
        self.attention_backward = partial(attention.attention_backward, self.attention)


class WeightTask(NamedTuple):
    """One weight gradient computed over the rows of every worker, as a model
    family's weight_tasks cuts them: rows lo…hi of one of its matrices (`name`) in
    `layer` (None: outside the blocks)."""
    name: str
    layer: int | None
    lo: int
    hi: int
    cost: int  # weight elements, to balance tasks
    params: tuple  # ((parameter, first row, end row or None), ...) it writes


def matmul_alone(fn, out, inp, weight, transposed=False):
    """The split of a model alone with its rows: all of out = fn(inp, weight) here.
    (transposed: fn multiplies by weight.T; a split that cuts columns needs to know.)"""
    fn(out, inp, weight)


class Parallel(NamedTuple):
    """How a parallel strategy runs a model: `split`, the hook every matmul goes
    through (matmul_alone, or the hybrid's share of it between barriers); `sync`, the
    barrier attention needs when the workers split a batch row."""
    split: object = matmul_alone
    sync: object = None


ALONE = Parallel()
