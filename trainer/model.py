"""GPT-2 forward and backward in NumPy float32, one *_forward/*_backward pair per layer.

Shapes: B rows, T positions, C channels, NH heads of HS = C/NH, V vocabulary,
N = B·T.  Every buffer a step touches lives in one activation arena allocated
by `GPT.__init__`; a step allocates nothing large.  Parameters and gradients
are dicts of views (into shared memory, in a worker).
"""
import numpy as np

from trainer.params import Layout

LN_EPS = np.float32(1e-5)
GELU_S = np.float32(np.sqrt(2.0 / np.pi))
GELU_K = np.float32(0.044715)


def encoder_forward(out, idx, wte, wpe):
    """idx (B,T) int -> out (B,T,C) = wte[idx] + wpe[:T]"""
    np.take(wte, idx, axis=0, out=out)
    out += wpe[:idx.shape[1]]


def encoder_backward(dwte, dwpe, dout, idx):
    """dout (B,T,C); dwte accumulates (the lm head wrote it first), dwpe is overwritten."""
    T = idx.shape[1]
    np.sum(dout, axis=0, out=dwpe[:T])
    dwpe[T:] = 0
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]))


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


def layernorm_backward(dx, dw, db, dout, x, mean, rstd, w, norm, dnorm, rowtmp):
    """dout (N,C) -> dx (N,C) accumulated, dw and db (C) overwritten.
    norm, dnorm (N,C) and rowtmp (N,1) are scratch; dout is destroyed."""
    np.subtract(x, mean, out=norm)
    norm *= rstd
    np.sum(dout, axis=0, out=db)
    np.multiply(dout, norm, out=dnorm)
    np.sum(dnorm, axis=0, out=dw)
    np.multiply(dout, w, out=dnorm)
    # dx = rstd · (dnorm − mean(dnorm) − norm · mean(dnorm · norm))
    np.multiply(dnorm, norm, out=dout)
    np.mean(dout, axis=1, keepdims=True, out=rowtmp)
    norm *= rowtmp
    np.mean(dnorm, axis=1, keepdims=True, out=rowtmp)
    dnorm -= rowtmp
    dnorm -= norm
    dnorm *= rstd
    dx += dnorm


def matmul_forward(out, inp, w, b):
    """out (N,OC) = inp (N,C) @ w (C,OC) + b (OC)"""
    np.matmul(inp, w, out=out)
    out += b


def matmul_backward(dinp, dw, db, dout, inp, w):
    """dout (N,OC) -> dinp (N,C), dw (C,OC), db (OC), all overwritten."""
    np.matmul(dout, w.T, out=dinp)
    np.matmul(inp.T, dout, out=dw)
    np.sum(dout, axis=0, out=db)


def lmhead_forward(logits, x, wte):
    """x (N,C) -> logits (N,V) = x @ wte.T: the head is tied to the token embedding."""
    np.matmul(x, wte.T, out=logits)


def lmhead_backward(dx, dwte, dlogits, x, wte):
    """dlogits (N,V) -> dx (N,C), dwte (V,C), both overwritten."""
    np.matmul(dlogits.T, x, out=dwte)
    np.matmul(dlogits, wte, out=dx)


def split_heads(x, n_head, parts):
    """(B,T,parts·C) -> `parts` strided views (B,NH,T,HS), no copy."""
    B, T, width = x.shape
    hs = width // parts // n_head
    x = x.reshape(B, T, parts, n_head, hs)
    return [x[:, :, i].transpose(0, 2, 1, 3) for i in range(parts)]


def attention_forward(out, att, qkv, mask, rowtmp, n_head, start=0):
    """qkv (B,T,3C) -> out (B,T−start,C): positions start… attend to 0…T−1 (start > 0
    when earlier keys and values are cached).  Saves att (B,NH,T−start,T)
    probabilities; mask (T−start,T) holds 0 where a query may look, -inf after
    it; rowtmp (B,NH,T−start,1)."""
    _, k, v = split_heads(qkv, n_head, 3)
    q = split_heads(qkv[:, start:], n_head, 3)[0]
    np.matmul(q, k.swapaxes(-1, -2), out=att)
    att *= np.float32(1.0 / np.sqrt(q.shape[-1]))
    att += mask
    np.max(att, axis=-1, keepdims=True, out=rowtmp)
    att -= rowtmp
    np.exp(att, out=att)
    np.sum(att, axis=-1, keepdims=True, out=rowtmp)
    att /= rowtmp
    (y,) = split_heads(out, n_head, 1)
    np.matmul(att, v, out=y)


def attention_backward(dqkv, datt, dout, qkv, att, rowtmp, n_head):
    """dout (B,T,C) -> dqkv (B,T,3C) overwritten; datt (B,NH,T,T), rowtmp scratch."""
    q, k, v = split_heads(qkv, n_head, 3)
    dq, dk, dv = split_heads(dqkv, n_head, 3)
    (dy,) = split_heads(dout, n_head, 1)
    np.matmul(dy, v.swapaxes(-1, -2), out=datt)
    np.matmul(att.swapaxes(-1, -2), dy, out=dv)
    # softmax backward: datt = att · (datt − Σ_j datt·att)
    np.einsum("bhij,bhij->bhi", datt, att, out=rowtmp[..., 0])
    datt -= rowtmp
    datt *= att
    datt *= np.float32(1.0 / np.sqrt(q.shape[-1]))
    np.matmul(datt, k, out=dq)
    np.matmul(datt.swapaxes(-1, -2), q, out=dk)


def gelu_tanh(out, x):
    """out = tanh(√(2/π)(x + 0.044715x³)), the tanh of GELU's approximation"""
    np.multiply(x, x, out=out)
    out *= x
    out *= GELU_K
    out += x
    out *= GELU_S
    np.tanh(out, out=out)


def gelu_forward(out, x):
    """tanh-approximate GELU: out = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))"""
    gelu_tanh(out, x)
    out += 1
    out *= x
    out *= np.float32(0.5)


def gelu_backward(dout, x, th, slope):
    """dout (N,4C) *= GELU'(x) in place; th, slope (N,4C) scratch.
    GELU' = (1 + th)(½ + ½·s·x(1 + 3k·x²)(1 − th)), th = tanh(s(x + k·x³))"""
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


def crossentropy_forward(logits, targets, rowtmp, rows):
    """logits (N,V) -> softmax probabilities in place; returns Σ −log p[target]
    as a Python float (accumulated in float64)."""
    np.max(logits, axis=1, keepdims=True, out=rowtmp)
    logits -= rowtmp
    target_logit = logits[rows, targets]  # N floats: the one small gather of the step
    np.exp(logits, out=logits)
    np.sum(logits, axis=1, keepdims=True, out=rowtmp)
    logits /= rowtmp
    return float(np.sum(np.log(rowtmp[:, 0]), dtype=np.float64)
                 - np.sum(target_logit, dtype=np.float64))


def crossentropy_backward(probs, targets, rows, scale):
    """probs (N,V) -> dlogits = (probs − onehot(targets)) · scale, in place."""
    probs[rows, targets] -= 1
    probs *= np.float32(scale)


class GPT:
    """The whole model for a fixed (B, T): the activation arena and the
    forward / backward passes over parameter and gradient views."""

    def __init__(self, cfg, B, T, params, grads=None):
        if T > cfg.block_size:
            raise ValueError(f"seq-len {T} is above the model's context of {cfg.block_size}")
        self.cfg, self.B, self.T, self.params, self.grads = cfg, B, T, params, grads
        L, C, NH, V, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, B * T
        shapes = [
            ("residual", (L + 1, N, C)),
            ("ln1", (L, N, C)), ("ln1_mean", (L, N, 1)), ("ln1_rstd", (L, N, 1)),
            ("qkv", (L, B, T, 3 * C)), ("att", (L, B, NH, T, T)), ("atty", (L, B, T, C)),
            ("resid2", (L, N, C)),
            ("ln2", (L, N, C)), ("ln2_mean", (L, N, 1)), ("ln2_rstd", (L, N, 1)),
            ("fch", (L, N, 4 * C)), ("fch_gelu", (L, N, 4 * C)),
            ("lnf", (N, C)), ("lnf_mean", (N, 1)), ("lnf_rstd", (N, 1)),
            ("logits", (N, V)), ("rowtmp", (N, 1)), ("att_rowtmp", (B, NH, T, 1)),
            ("mask", (T, T)),
        ]
        if grads is not None:
            shapes += [
                ("dres", (N, C)), ("dln", (N, C)), ("norm", (N, C)), ("dnorm", (N, C)),
                ("dqkv", (B, T, 3 * C)), ("datt", (B, NH, T, T)), ("datty", (B, T, C)),
                ("dfch", (N, 4 * C)), ("gelu_th", (N, 4 * C)), ("gelu_slope", (N, 4 * C)),
            ]
        self.layout = Layout(shapes)
        self.arena, self.a = self.layout.allocate()
        self.a["mask"][...] = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        self.rows = np.arange(N)
        self.idx = np.zeros((B, T), dtype=np.int64)
        self.targets = np.zeros(N, dtype=np.int64)

    def load_batch(self, tokens):
        """tokens: B·T+1 consecutive token ids (any int dtype)."""
        n = self.B * self.T
        self.idx.reshape(-1)[...] = tokens[:n]
        self.targets[...] = tokens[1:n + 1]

    def forward(self):
        """-> Σ over the B·T targets of −log p(target); leaves probabilities in logits."""
        cfg, p, a = self.cfg, self.params, self.a
        B, T, C = self.B, self.T, cfg.n_embd
        encoder_forward(a["residual"][0].reshape(B, T, C), self.idx, p["wte.weight"], p["wpe.weight"])
        for l in range(cfg.n_layer):
            h = f"h.{l}."
            x = a["residual"][l]
            layernorm_forward(a["ln1"][l], a["ln1_mean"][l], a["ln1_rstd"][l], x,
                              p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            matmul_forward(a["qkv"][l].reshape(-1, 3 * C), a["ln1"][l],
                           p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
            attention_forward(a["atty"][l], a["att"][l], a["qkv"][l], a["mask"],
                              a["att_rowtmp"], cfg.n_head)
            resid2 = a["resid2"][l]
            matmul_forward(resid2, a["atty"][l].reshape(-1, C),
                           p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
            resid2 += x
            layernorm_forward(a["ln2"][l], a["ln2_mean"][l], a["ln2_rstd"][l], resid2,
                              p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            matmul_forward(a["fch"][l], a["ln2"][l], p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
            gelu_forward(a["fch_gelu"][l], a["fch"][l])
            out = a["residual"][l + 1]
            matmul_forward(out, a["fch_gelu"][l], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
            out += resid2
        layernorm_forward(a["lnf"], a["lnf_mean"], a["lnf_rstd"], a["residual"][cfg.n_layer],
                          p["ln_f.weight"], p["ln_f.bias"])
        lmhead_forward(a["logits"], a["lnf"], p["wte.weight"])
        return crossentropy_forward(a["logits"], self.targets, a["rowtmp"], self.rows)

    def backward(self, loss_scale):
        """Gradients of loss_scale · Σ −log p into self.grads (overwritten, not accumulated)."""
        cfg, p, g, a = self.cfg, self.params, self.grads, self.a
        L, C = cfg.n_layer, cfg.n_embd
        ln_scratch = (a["norm"], a["dnorm"], a["rowtmp"])
        dlogits = a["logits"]
        crossentropy_backward(dlogits, self.targets, self.rows, loss_scale)
        lmhead_backward(a["dln"], g["wte.weight"], dlogits, a["lnf"], p["wte.weight"])
        dres = a["dres"]
        dres[...] = 0
        layernorm_backward(dres, g["ln_f.weight"], g["ln_f.bias"], a["dln"], a["residual"][L],
                           a["lnf_mean"], a["lnf_rstd"], p["ln_f.weight"], *ln_scratch)
        for l in reversed(range(L)):
            h = f"h.{l}."
            dfch = a["dfch"]
            matmul_backward(dfch, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"], dres,
                            a["fch_gelu"][l], p[h + "mlp.c_proj.weight"])
            gelu_backward(dfch, a["fch"][l], a["gelu_th"], a["gelu_slope"])
            matmul_backward(a["dln"], g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"], dfch,
                            a["ln2"][l], p[h + "mlp.c_fc.weight"])
            layernorm_backward(dres, g[h + "ln_2.weight"], g[h + "ln_2.bias"], a["dln"],
                               a["resid2"][l], a["ln2_mean"][l], a["ln2_rstd"][l],
                               p[h + "ln_2.weight"], *ln_scratch)
            datty = a["datty"]
            matmul_backward(datty.reshape(-1, C), g[h + "attn.c_proj.weight"],
                            g[h + "attn.c_proj.bias"], dres, a["atty"][l].reshape(-1, C),
                            p[h + "attn.c_proj.weight"])
            attention_backward(a["dqkv"], a["datt"], datty, a["qkv"][l], a["att"][l],
                               a["att_rowtmp"], cfg.n_head)
            matmul_backward(a["dln"], g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"],
                            a["dqkv"].reshape(-1, 3 * C), a["ln1"][l], p[h + "attn.c_attn.weight"])
            layernorm_backward(dres, g[h + "ln_1.weight"], g[h + "ln_1.bias"], a["dln"],
                               a["residual"][l], a["ln1_mean"][l], a["ln1_rstd"][l],
                               p[h + "ln_1.weight"], *ln_scratch)
        encoder_backward(g["wte.weight"], g["wpe.weight"], dres.reshape(self.B, self.T, C), self.idx)
