"""The whole GPT-2 for B rows of T tokens: the activation arena, forward, and
backward, built from model.py's layers.

In a worker pool the activation arena is shared memory holding the rows of every
worker.  Row-wise layers (layernorm, attention, GELU, cross-entropy) run on the
worker's own rows.  A matmul whose weight is bigger than its input (GPT-2 124M
at a few rows per worker) runs on the worker's share of output columns for the
rows of all workers, so the pool packs each weight once and each GEMM sees the
whole batch; one with a smaller weight (many rows, small model) runs on rows.
A barrier (`sync`) separates the phases.
Weight gradients are whole matrices, split among the workers by task, each
also over the rows of all workers, so no gradient needs summing across workers.
Parameters and gradients are dicts of views (into shared memory, in a worker).

In bf16 (`low_params` given) every matmul reads bf16 copies: of the weights (made
once per step by the AdamW pass) and of each matmul input and output gradient,
made once by the worker that computed those rows (`made`), in a second arena.
"""
import numpy as np

from trainer.gemm import to_low
from trainer.model import (attention_backward, attention_forward, bias_backward, crossentropy_backward,
                           crossentropy_forward, encoder_backward, encoder_forward, gelu_backward,
                           gelu_forward, layernorm_backward, layernorm_forward,
                           layernorm_weights_backward, lmhead_backward, lmhead_forward,
                           lmhead_weights_backward, matmul_backward, matmul_forward,
                           matmul_weights_backward)
from trainer.params import Layout


def activation_shapes(cfg, B, T, training):
    """[(name, shape, row axis)] of every activation of B batch rows: the row axis is
    the one that runs over the batch (B or N = B·T), after the layer axis if any."""
    L, C, NH, V, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, B * T
    shapes = [
        ("residual", (L + 1, N, C), 1),
        ("ln1", (L, N, C), 1), ("ln1_mean", (L, N, 1), 1), ("ln1_rstd", (L, N, 1), 1),
        ("qkv", (L, B, T, 3 * C), 1), ("att", (L, B, NH, T, T), 1), ("atty", (L, B, T, C), 1),
        ("resid2", (L, N, C), 1),
        ("ln2", (L, N, C), 1), ("ln2_mean", (L, N, 1), 1), ("ln2_rstd", (L, N, 1), 1),
        ("fch", (L, N, 4 * C), 1), ("fch_gelu", (L, N, 4 * C), 1),
        ("lnf", (N, C), 0), ("lnf_mean", (N, 1), 0), ("lnf_rstd", (N, 1), 0),
        ("logits", (N, V), 0), ("rowtmp", (N, 1), 0), ("att_rowtmp", (B, NH, T, 1), 0),
    ]
    if training:  # gradients of every matmul output and layernorm input are kept for the weights
        shapes += [
            ("dresidual", (L + 1, N, C), 1), ("dresid2", (L, N, C), 1),
            ("dln1", (L, N, C), 1), ("dln2", (L, N, C), 1), ("dlnf", (N, C), 0),
            ("dqkv", (L, B, T, 3 * C), 1), ("dfch", (L, N, 4 * C), 1),
            ("norm", (N, C), 0), ("dnorm", (N, C), 0), ("datt", (B, NH, T, T), 0),
            ("datty", (B, T, C), 0), ("gelu_th", (N, 4 * C), 0), ("gelu_slope", (N, 4 * C), 0),
        ]
    return shapes


# activations that matmuls read: in bf16 each gets a bf16 copy (the logits' is of dlogits)
LOW_COPIES = ("ln1", "atty", "ln2", "fch_gelu", "lnf", "dqkv", "dresid2", "dfch", "dresidual", "logits")
# ... of which only matmuls read these: in bf16 their fp32 rows live in a one-layer scratch
LOW_ONLY = ("ln1", "atty", "ln2", "fch_gelu", "lnf")


def low_shapes(cfg, B, T, training):
    return [shape for shape in activation_shapes(cfg, B, T, training) if shape[0] in LOW_COPIES]


def low_layout(cfg, B, T, training):
    """The layout of the bf16 copies' arena."""
    return Layout([(name, shape) for name, shape, _ in low_shapes(cfg, B, T, training)])


def shared_shapes(cfg, B, T, training, low):
    """The activations that live in the (shared) fp32 arena."""
    return [shape for shape in activation_shapes(cfg, B, T, training) if not (low and shape[0] in LOW_ONLY)]


def activation_layout(cfg, B, T, training, low=False):
    return Layout([(name, shape) for name, shape, _ in shared_shapes(cfg, B, T, training, low)])


def one_layer_scratch(shape, axis, n_parts):
    """A private buffer of one layer's rows of this worker, seen as every layer's
    (the layer axis has stride 0): the fp32 side of a LOW_ONLY activation."""
    rows = list(shape)
    rows[axis] //= n_parts
    if axis == 0:
        return np.zeros(rows, dtype=np.float32)
    layer = np.zeros(rows[1:], dtype=np.float32)
    return np.lib.stride_tricks.as_strided(layer, shape=rows, strides=(0,) + layer.strides)


MATRIX_SIZE = {"attn.c_attn": 3, "attn.c_proj": 1, "mlp.c_fc": 4, "mlp.c_proj": 4}  # × C²
LAYERNORM_OF = {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}  # its input's layernorm


def weight_grad_tasks(cfg, n_parts):
    """The step's weight gradients cut into tasks for n_parts workers -> [[task] by part].
    A task is one whole matrix (name, layer), so each GEMM runs once over the rows of
    every worker, or a slice ("wte", lo, hi) of the tied embedding; greedy, longest
    first to the least loaded part, which balances them to within one matrix."""
    C, V = cfg.n_embd, cfg.vocab_size
    cuts = [V * k // n_parts for k in range(n_parts + 1)]
    tasks = [(("wte", lo, hi), (hi - lo) * C) for lo, hi in zip(cuts, cuts[1:])]
    tasks += [((name, l), size * C * C) for l in range(cfg.n_layer) for name, size in MATRIX_SIZE.items()]
    parts, load = [[] for _ in range(n_parts)], [0] * n_parts
    for task, cost in sorted(tasks, key=lambda t: -t[1]):
        r = load.index(min(load))
        parts[r].append(task)
        load[r] += cost
    return parts


def task_params(task):
    """-> [(parameter name, first row, end row or None)] a task's gradients cover."""
    if task[0] == "wte":
        _, lo, hi = task
        rest = [("wpe.weight", 0, None), ("ln_f.weight", 0, None), ("ln_f.bias", 0, None)]
        return [("wte.weight", lo, hi)] + (rest if lo == 0 else [])
    name, l = task
    names = [name] + ([LAYERNORM_OF[name]] if name in LAYERNORM_OF else [])
    return [(f"h.{l}.{n}.{kind}", 0, None) for n in names for kind in ("weight", "bias")]


def rows_of(full, axis, part, n_parts):
    """The view of worker `part`'s batch rows (a contiguous 1/n_parts of `axis`)."""
    n = full.shape[axis] // n_parts
    return full[(slice(None),) * axis + (slice(part * n, (part + 1) * n),)]


class GPT:
    """The model for B rows of T tokens: the activation arena and the passes over
    parameter and gradient views.  In a worker pool, `arena` is shared by n_parts
    workers (worker `part` owns rows part·B…), and `sync` is their barrier; alone,
    the arena is allocated here and sync does nothing.  low_params (bf16 weight
    views) turns on bf16 matmuls; low_arena then holds the activations' bf16 copies."""

    def __init__(self, cfg, B, T, params, grads=None, arena=None, part=0, n_parts=1, sync=None,
                 low_params=None, low_arena=None):
        if T > cfg.block_size:
            raise ValueError(f"seq-len {T} is above the model's context of {cfg.block_size}")
        self.cfg, self.B, self.T, self.params, self.grads = cfg, B, T, params, grads
        self.part, self.n_parts, self.sync = part, n_parts, sync or (lambda: None)
        training, self.low = grads is not None, low_params is not None
        shapes = shared_shapes(cfg, B * n_parts, T, training, self.low)
        self.layout = Layout([(name, shape) for name, shape, _ in shapes])
        if arena is None:
            arena = np.zeros(self.layout.size, dtype=np.float32)
        self.full = self.layout.views(arena)
        self.a = {name: rows_of(self.full[name], axis, part, n_parts) for name, _, axis in shapes}
        self.w = low_params if self.low else params  # the weights every matmul reads
        self.o, self.o_own = self.full, self.a  # every matmul's activation operands
        if self.low:
            lows = low_shapes(cfg, B * n_parts, T, training)
            layout = low_layout(cfg, B * n_parts, T, training)
            if low_arena is None:
                low_arena = np.zeros(layout.size, dtype=low_params["wte.weight"].dtype)
            self.o = layout.views(low_arena)
            self.o_own = {name: rows_of(self.o[name], axis, part, n_parts) for name, _, axis in lows}
            self.a.update({name: one_layer_scratch(shape, axis, n_parts) for name, shape, axis in lows
                           if name in LOW_ONLY})
        self.mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        if training:  # layernorm weight gradients normalise the rows of all workers
            self.norm_all = np.zeros((B * n_parts * T, cfg.n_embd), dtype=np.float32)
        self.rows = np.arange(B * T)
        self.idx_all = np.zeros((B * n_parts, T), dtype=np.int64)
        self.idx = rows_of(self.idx_all, 0, part, n_parts)
        self.targets = np.zeros(B * T, dtype=np.int64)
        self.first_token = part * B * T

    def load_batch(self, tokens):
        """tokens: the B·n_parts·T+1 consecutive token ids of the pool's rows (any int dtype)."""
        self.idx_all.reshape(-1)[...] = tokens[:self.idx_all.size]
        first = self.first_token
        self.targets[...] = tokens[first + 1:first + self.targets.size + 1]

    def made(self, name, *index):
        """This worker's rows of activation `name` are final: make their bf16 copy."""
        if self.low:
            to_low(self.o_own[name][index], self.a[name][index])

    def share(self, out, inp, w):
        """-> this worker's (out, inp, w) of out = inp @ w over the pool's rows.  When w is
        the bigger operand: its columns of out for all rows, so each worker packs only its
        part of w and the GEMM sees the whole batch; otherwise its own rows (a worker
        would read all of inp to use a part of a small w)."""
        if w.size <= inp.size:
            return rows_of(out, 0, self.part, self.n_parts), rows_of(inp, 0, self.part, self.n_parts), w
        n = out.shape[1]
        c = slice(n * self.part // self.n_parts, n * (self.part + 1) // self.n_parts)
        return out[:, c], inp, w[:, c]

    def matmul_backward(self, dinp, dout, w):
        """This worker's share of dinp = dout @ w.T (see share)."""
        dinp, dout, w_t = self.share(dinp, dout, w.T)
        matmul_backward(dinp, dout, w_t.T)

    def forward(self):
        """-> Σ over this worker's B·T targets of −log p(target); leaves probabilities in
        logits.  Row-wise layers run on this worker's rows, matmuls on its share (see
        share), sync() (a barrier in a pool) between phases.  Biases and residuals are
        added on rows: NumPy is several times slower on a column block."""
        cfg, p, w, a, f, o, sync = self.cfg, self.params, self.w, self.a, self.full, self.o, self.sync
        B, T, C, L = self.B, self.T, cfg.n_embd, cfg.n_layer
        encoder_forward(a["residual"][0].reshape(B, T, C), self.idx, p["wte.weight"], p["wpe.weight"])
        for l in range(L):
            h = f"h.{l}."
            layernorm_forward(a["ln1"][l], a["ln1_mean"][l], a["ln1_rstd"][l], a["residual"][l],
                              p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            self.made("ln1", l)
            sync()
            matmul_forward(*self.share(f["qkv"][l].reshape(-1, 3 * C), o["ln1"][l],
                                       w[h + "attn.c_attn.weight"]))
            sync()
            a["qkv"][l] += p[h + "attn.c_attn.bias"]
            attention_forward(a["atty"][l], a["att"][l], a["qkv"][l], self.mask,
                              a["att_rowtmp"], cfg.n_head)
            self.made("atty", l)
            sync()
            matmul_forward(*self.share(f["resid2"][l], o["atty"][l].reshape(-1, C),
                                       w[h + "attn.c_proj.weight"]))
            sync()
            resid2 = a["resid2"][l]
            resid2 += p[h + "attn.c_proj.bias"]
            resid2 += a["residual"][l]
            layernorm_forward(a["ln2"][l], a["ln2_mean"][l], a["ln2_rstd"][l], resid2,
                              p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            self.made("ln2", l)
            sync()
            matmul_forward(*self.share(f["fch"][l], o["ln2"][l], w[h + "mlp.c_fc.weight"]))
            sync()
            a["fch"][l] += p[h + "mlp.c_fc.bias"]
            gelu_forward(a["fch_gelu"][l], a["fch"][l])
            self.made("fch_gelu", l)
            sync()
            matmul_forward(*self.share(f["residual"][l + 1], o["fch_gelu"][l],
                                       w[h + "mlp.c_proj.weight"]))
            sync()
            out = a["residual"][l + 1]
            out += p[h + "mlp.c_proj.bias"]
            out += resid2
        layernorm_forward(a["lnf"], a["lnf_mean"], a["lnf_rstd"], a["residual"][L],
                          p["ln_f.weight"], p["ln_f.bias"])
        self.made("lnf")
        sync()
        logits, lnf, wte_t = self.share(f["logits"], o["lnf"], w["wte.weight"].T)
        lmhead_forward(logits, lnf, wte_t.T)
        sync()
        return crossentropy_forward(a["logits"], self.targets, a["rowtmp"], self.rows)

    def backward(self, loss_scale):
        """Every gradient of loss_scale · Σ −log p into self.grads (overwritten), for a
        model that is not part of a pool."""
        self.backward_inputs(loss_scale)
        for task in weight_grad_tasks(self.cfg, 1)[0]:
            self.backward_weights(task, self.grads)

    def backward_inputs(self, loss_scale):
        """The gradient of every activation, kept for backward_weights; split between
        rows and columns like forward."""
        cfg, p, w, a, f, o, sync = self.cfg, self.params, self.w, self.a, self.full, self.o, self.sync
        L, C = cfg.n_layer, cfg.n_embd
        ln_scratch = (a["norm"], a["dnorm"], a["rowtmp"])
        crossentropy_backward(a["logits"], self.targets, self.rows, loss_scale)
        self.made("logits")
        sync()
        lmhead_backward(*self.share(f["dlnf"], o["logits"], w["wte.weight"]))
        sync()
        layernorm_backward(a["dresidual"][L], None, a["dlnf"], a["residual"][L],
                           a["lnf_mean"], a["lnf_rstd"], p["ln_f.weight"], *ln_scratch)
        self.made("dresidual", L)
        sync()
        for l in reversed(range(L)):
            h = f"h.{l}."
            self.matmul_backward(f["dfch"][l], o["dresidual"][l + 1], w[h + "mlp.c_proj.weight"])
            sync()
            gelu_backward(a["dfch"][l], a["fch"][l], a["gelu_th"], a["gelu_slope"])
            self.made("dfch", l)
            sync()
            self.matmul_backward(f["dln2"][l], o["dfch"][l], w[h + "mlp.c_fc.weight"])
            sync()
            layernorm_backward(a["dresid2"][l], a["dresidual"][l + 1], a["dln2"][l], a["resid2"][l],
                               a["ln2_mean"][l], a["ln2_rstd"][l], p[h + "ln_2.weight"], *ln_scratch)
            self.made("dresid2", l)
            sync()
            self.matmul_backward(f["datty"].reshape(-1, C), o["dresid2"][l], w[h + "attn.c_proj.weight"])
            sync()
            attention_backward(a["dqkv"][l], a["datt"], a["datty"], a["qkv"][l], a["att"][l],
                               a["att_rowtmp"], cfg.n_head)
            self.made("dqkv", l)
            sync()
            self.matmul_backward(f["dln1"][l], o["dqkv"][l].reshape(-1, 3 * C),
                                 w[h + "attn.c_attn.weight"])
            sync()
            layernorm_backward(a["dresidual"][l], a["dresid2"][l], a["dln1"][l], a["residual"][l],
                               a["ln1_mean"][l], a["ln1_rstd"][l], p[h + "ln_1.weight"], *ln_scratch)
            if l:  # dresidual[0] feeds only the embeddings, no matmul
                self.made("dresidual", l)
            sync()

    def backward_weights(self, task, g):
        """One task's weight gradients into the views g (overwritten), from the rows of
        every worker; run after backward_inputs has finished on all of them."""
        C, f, o, norm = self.cfg.n_embd, self.full, self.o, self.norm_all
        if task[0] == "wte":
            _, lo, hi = task
            lmhead_weights_backward(g["wte.weight"][lo:hi], o["logits"][:, lo:hi], o["lnf"])
            dres0 = f["dresidual"][0].reshape(*self.idx_all.shape, C)
            encoder_backward(g["wte.weight"][lo:hi], g["wpe.weight"] if lo == 0 else None,
                             dres0, self.idx_all, lo)
            if lo == 0:
                layernorm_weights_backward(g["ln_f.weight"], g["ln_f.bias"], f["dlnf"],
                                           f["residual"][self.cfg.n_layer], f["lnf_mean"],
                                           f["lnf_rstd"], norm)
            return
        name, l = task
        h = f"h.{l}.{name}."
        dw, db = g[h + "weight"], g[h + "bias"]
        if name == "attn.c_attn":
            matmul_weights_backward(dw, o["dqkv"][l].reshape(-1, 3 * C), o["ln1"][l])
            bias_backward(db, f["dqkv"][l].reshape(-1, 3 * C))
            layernorm_weights_backward(g[f"h.{l}.ln_1.weight"], g[f"h.{l}.ln_1.bias"], f["dln1"][l],
                                       f["residual"][l], f["ln1_mean"][l], f["ln1_rstd"][l], norm)
        elif name == "attn.c_proj":
            matmul_weights_backward(dw, o["dresid2"][l], o["atty"][l].reshape(-1, C))
            bias_backward(db, f["dresid2"][l])
        elif name == "mlp.c_fc":
            matmul_weights_backward(dw, o["dfch"][l], o["ln2"][l])
            bias_backward(db, f["dfch"][l])
            layernorm_weights_backward(g[f"h.{l}.ln_2.weight"], g[f"h.{l}.ln_2.bias"], f["dln2"][l],
                                       f["resid2"][l], f["ln2_mean"][l], f["ln2_rstd"][l], norm)
        else:  # mlp.c_proj
            matmul_weights_backward(dw, o["dresidual"][l + 1], o["fch_gelu"][l])
            bias_backward(db, f["dresidual"][l + 1])
