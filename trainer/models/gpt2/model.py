"""GPT-2's model: its math for B rows of T tokens: forward, the activations' gradients, and the
weights' gradients, over the activation table (activations.py) and parameter views,
built from model.py's layers.

Every matmul goes through `split`, a hook the parallel strategy supplies: alone (one
process, or data parallelism) it is the plain matmul; the hybrid strategy runs each
worker's share of it over the rows of every worker, between barriers.  Before a
matmul reads an activation, this worker makes the bf16 copy of its own rows
(`Activations.made`; nothing without bf16).  Row-wise layers run on this worker's
token rows; attention on its share of the (batch row, head) pairs, which are the
same rows when the workers divide the batch, and otherwise need `sync` (a barrier)
before and after it.

Weight gradients are cut into tasks, one ordered list the strategies share
(`weight_tasks`): the hybrid strategy balances them over workers, data parallelism
groups them into its reduction buckets.
"""
from typing import NamedTuple

import numpy as np

from trainer.activations import Activations, Table, rows_of, share
from trainer.model import ALONE, WeightTask


class Matrix(NamedTuple):
    """A block's linear layer, as its weight gradient needs it."""
    fan_in: int  # rows of its weight, in C
    fan_out: int  # columns, in C
    inp: str  # the activation it multiplies
    dout: str  # its output's gradient ...
    dout_layer: int  # ... at layer l + dout_layer of that activation
    layernorm: tuple | None  # (parameter, dout, input, mean, rstd) of the layernorm before it


MATRICES = {
    "attn.c_attn": Matrix(1, 3, "ln1", "dqkv", 0, ("ln_1", "dln1", "residual", "ln1_mean", "ln1_rstd")),
    "attn.c_proj": Matrix(1, 1, "atty", "dresid2", 0, None),
    "mlp.c_fc": Matrix(1, 4, "ln2", "dfch", 0, ("ln_2", "dln2", "resid2", "ln2_mean", "ln2_rstd")),
    "mlp.c_proj": Matrix(4, 1, "fch_gelu", "dresidual", 1, None),
}


def attention_pieces(B, n_head, part, n_parts):
    """Worker `part`'s share of the B·n_head (row, head) pairs, contiguous in row
    order, as rectangles [(b0, b1, h0, h1)]: whole rows where it can."""
    lo, hi = share(B * n_head, part, n_parts)
    pieces = []
    while lo < hi:
        b, h = divmod(lo, n_head)
        if h == 0 and hi - lo >= n_head:
            rows = (hi - lo) // n_head
            pieces.append((b, b + rows, 0, n_head))
        else:
            pieces.append((b, b + 1, h, min(n_head, h + hi - lo)))
        lo += (pieces[-1][1] - b) * (pieces[-1][3] - h)
    return pieces


def weight_tasks(cfg, vocab_parts=1, matrix_parts=1):
    """Every weight-gradient task of a step in parameter-layout order; the embedding
    is cut into vocab_parts slices of its rows (a task named "wte"; its first slice
    also takes wpe and ln_f), each block matrix into matrix_parts (the first slice
    also takes its bias and the layernorm before it)."""
    C, V = cfg.n_embd, cfg.vocab_size
    cuts = [V * k // vocab_parts for k in range(vocab_parts + 1)]
    tasks = []
    for lo, hi in zip(cuts, cuts[1:]):
        rest = (("wpe.weight", 0, None), ("ln_f.weight", 0, None), ("ln_f.bias", 0, None))
        tasks.append(WeightTask("wte", None, lo, hi, (hi - lo) * C, (("wte.weight", lo, hi),)
                                + (rest if lo == 0 else ())))
    for l in range(cfg.n_layer):
        for name, matrix in MATRICES.items():
            norm = (matrix.layernorm[0],) if matrix.layernorm else ()
            rest = ((f"h.{l}.{name}.bias", 0, None),) + tuple(
                (f"h.{l}.{n}.{kind}", 0, None) for n in norm for kind in ("weight", "bias"))
            rows = matrix.fan_in * C
            cuts = [rows * k // matrix_parts for k in range(matrix_parts + 1)]
            for lo, hi in zip(cuts, cuts[1:]):
                tasks.append(WeightTask(name, l, lo, hi, (hi - lo) * matrix.fan_out * C,
                                        ((f"h.{l}.{name}.weight", lo, hi),) + (rest if lo == 0 else ())))
    return tasks


class Block(NamedTuple):
    """One transformer block's parameters; *_w are as matmuls read them (bf16 copies in bf16)."""
    ln_1_w: np.ndarray
    ln_1_b: np.ndarray
    attn_w: np.ndarray
    attn_b: np.ndarray
    attn_proj_w: np.ndarray
    attn_proj_b: np.ndarray
    ln_2_w: np.ndarray
    ln_2_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray
    fc_proj_w: np.ndarray
    fc_proj_b: np.ndarray


def blocks_of(cfg, params, weights):
    return [Block(params[f"h.{l}.ln_1.weight"], params[f"h.{l}.ln_1.bias"],
                  weights[f"h.{l}.attn.c_attn.weight"], params[f"h.{l}.attn.c_attn.bias"],
                  weights[f"h.{l}.attn.c_proj.weight"], params[f"h.{l}.attn.c_proj.bias"],
                  params[f"h.{l}.ln_2.weight"], params[f"h.{l}.ln_2.bias"],
                  weights[f"h.{l}.mlp.c_fc.weight"], params[f"h.{l}.mlp.c_fc.bias"],
                  weights[f"h.{l}.mlp.c_proj.weight"], params[f"h.{l}.mlp.c_proj.bias"])
            for l in range(cfg.n_layer)]


class GPT:
    """The model for B rows of T tokens (every worker's, when a pool shares the
    activation table `acts`; this worker's share of them is acts.tokens).
    weights (trainer.trainable.Weights): the parameters' views, what trains (every
    parameter, or LoRA's adapters at its matrix sites: `sites`) and their bf16
    copies (which turn on bf16 matmuls); grads (views of what trains), to train.  acts is allocated here when not given (recompute: keep only each block's
    input and run the block's forward again inside its backward; a given table says
    itself).  parallel (trainer.model.Parallel): the matmul split and the barrier
    attention needs when the workers split a batch row (see above).
    layers: trainer.model.Layers (its layers with the GEMM engine they multiply on),
    or a stand-in with the same functions (the profiler's)."""
    MATRICES = MATRICES  # the matrix sites, for what trains beside them

    def __init__(self, cfg, B, T, weights, grads=None, *, layers, acts=None, parallel=ALONE, recompute=False):
        if T > cfg.block_size:
            raise ValueError(f"seq-len {T} is above the model's context of {cfg.block_size}")
        self.cfg, self.B, self.T, self.params, self.grads = cfg, B, T, weights.params, grads
        self.split, self.layers = parallel.split, layers
        self.trains = weights.trains
        training = grads is not None
        if acts is None:
            acts = Activations(Table(cfg, self.trains, B, T, training, recompute), layers.engine,
                               low_dtype=None if weights.low is None else weights.low["wte.weight"].dtype)
        self.acts = acts
        self.weights = self.params if weights.low is None else weights.low  # what matmuls read
        self.blocks = blocks_of(cfg, self.params, self.weights)
        if training:  # layernorm weight gradients normalise the rows of all workers
            self.norm_all = np.zeros((B * T, cfg.n_embd), dtype=np.float32)
        self.rows = np.arange(B * T)
        self.idx_all = np.zeros((B, T), dtype=np.int64)
        self.first, end = acts.tokens
        self.idx = self.idx_all.reshape(-1)[self.first:end]
        self.targets_all = np.zeros(B * T, dtype=np.int64)
        self.pieces = attention_pieces(B, cfg.n_head, acts.part, acts.n_parts)
        self.sync = parallel.sync if B % acts.n_parts else lambda: None
        self.head_slices = self.trains.head_rows()  # the embedding rows whose gradient this worker computes
        self.batch_key = (0, 0)  # (micro-batch, first token row): what per-batch draws (dropout) key on
        self.sites = self.trains.sites(self, weights)

    def load_batch(self, tokens, key=(0, 0)):
        """tokens: the consecutive token ids of every worker's rows, plus one (any int
        dtype); key: (micro-batch, first token row in the global batch)."""
        self.idx_all.reshape(-1)[...] = tokens[:self.idx_all.size]
        self.targets_all[...] = tokens[1:self.idx_all.size + 1]
        self.batch_key = key

    def forward(self, loss_scale=None, grads=None):
        """-> Σ of −log p(target) over this worker's share of the rows (see head).
        Training (loss_scale given): also the lm head's gradients, fused with it:
        dlnf, and this worker's head_slices of grads["wte.weight"] (default self.grads),
        for backward_inputs to go on from.  Biases and residuals are added on this
        worker's rows."""
        nn, mine, p, L = self.layers, self.acts.mine, self.params, self.cfg.n_layer
        self.sites.start(loss_scale is not None)
        self.blocks_forward()
        nn.layernorm_forward(mine.lnf, mine.lnf_mean, mine.lnf_rstd, mine.residual[L],
                             p["ln_f.weight"], p["ln_f.bias"])
        return self.head(loss_scale, self.grads if grads is None else grads)

    def blocks_forward(self):
        """The embeddings of this worker's token rows, then every block: residual[0]
        -> residual[L].  Positions count from acts.past (the rows a KV cache holds)."""
        nn, p, past = self.layers, self.params, self.acts.past
        nn.encoder_forward(self.acts.mine.residual[0], self.idx, p["wte.weight"], p["wpe.weight"],
                           past + self.first, past + self.T)
        for l, block in enumerate(self.blocks):
            self.block_forward(l, block)

    def next_logits(self, out):
        """Sampling (acts: a trainer.activations.KVCache's rows, which keep every
        layer's keys and values): out (V,) = the logits of the token after the last
        row loaded (load_batch)."""
        nn, mine, p, L = self.layers, self.acts.mine, self.params, self.cfg.n_layer
        self.blocks_forward()
        last = mine.residual[L][self.T - 1:]
        nn.layernorm_forward(mine.lnf[:1], mine.lnf_mean[:1], mine.lnf_rstd[:1], last, p["ln_f.weight"],
                             p["ln_f.bias"])
        np.matmul(p["wte.weight"], mine.lnf[0], out=out)
        return out

    def head(self, loss_scale, grads):
        """The tied lm head and cross-entropy, a chunk of rows at a time (Liger
        Kernel's fused linear cross-entropy): the N x V logits are never all in
        memory.  Each chunk's logits are a split matmul over the rows of every
        worker; this worker takes the softmax of its share of the chunk's rows.
        -> Σ −log p over those shares.  With loss_scale, also each chunk's dlogits,
        dlnf of its rows, and, added up over chunks, grads["wte.weight"] of this
        worker's head_slices of the vocabulary."""
        nn, full, acts = self.layers, self.acts.full, self.acts
        lnf, wte, part, n_parts = acts.made("lnf"), self.weights["wte.weight"], acts.part, acts.n_parts
        N, chunk, loss = lnf.shape[0], full.logits.shape[0], 0.0
        for first in range(0, N, chunk):
            end = min(first + chunk, N)
            logits = full.logits[:end - first]
            self.split(nn.lmhead_forward, logits, lnf[first:end], wte, True)
            share, targets = (rows_of(x, 0, part, n_parts) for x in (logits, self.targets_all[first:end]))
            rows = self.rows[:share.shape[0]]
            loss += nn.crossentropy_forward(share, targets, acts.mine.rowtmp[:rows.size], rows)
            if loss_scale is None:
                continue
            nn.crossentropy_backward(share, targets, rows, loss_scale)
            dlogits = acts.made_first("logits", end - first)
            self.split(nn.lmhead_backward, full.dlnf[first:end], dlogits, wte)
            for lo, hi in self.head_slices:  # every worker's dlogits are in (the split's barrier)
                nn.lmhead_weights_backward(grads["wte.weight"][lo:hi], dlogits[:, lo:hi], lnf[first:end],
                                           accumulate=first > 0)
        return loss

    def block_forward(self, l, b, again=False):
        """residual[l] -> residual[l+1] (llm.c's gpt2_forward, one layer).  again: the
        recompute inside the backward, which stops at what the backward reads."""
        nn, mine, full, made, split = self.layers, self.acts.mine, self.acts.full, self.acts.made, self.split
        past = self.acts.past  # earlier positions' keys and values, in qkv before these rows' (sampling)
        nn.layernorm_forward(mine.ln1[l], mine.ln1_mean[l], mine.ln1_rstd[l], mine.residual[l], b.ln_1_w, b.ln_1_b)
        split(nn.matmul_forward, full.qkv[l][past:], made("ln1", l), b.attn_w)
        rows_qkv = mine.qkv[l][past:]
        rows_qkv += b.attn_b
        self.sites.forward(l, "attn.c_attn", rows_qkv)
        self.sync()  # every worker's rows of qkv have their bias
        for heads, qkv, atty, lse, _, _ in self.attention_views(l):
            nn.attention_forward(atty, lse, qkv, self.cfg.n_head, past, heads_of=heads)
        self.sync()  # all of atty is in before this worker converts its rows
        split(nn.matmul_forward, full.resid2[l], made("atty", l), b.attn_proj_w)
        resid2 = mine.resid2[l]
        resid2 += b.attn_proj_b
        resid2 += mine.residual[l]
        self.sites.forward(l, "attn.c_proj", resid2)
        nn.layernorm_forward(mine.ln2[l], mine.ln2_mean[l], mine.ln2_rstd[l], resid2, b.ln_2_w, b.ln_2_b)
        split(nn.matmul_forward, full.fch[l], made("ln2", l), b.fc_w)
        mine.fch[l] += b.fc_b
        self.sites.forward(l, "mlp.c_fc", mine.fch[l])
        nn.gelu_forward(mine.fch_gelu[l], mine.fch[l])
        if again:  # the backward reads fch_gelu's bf16 copy, and u of the projection after it
            made("fch_gelu", l)
            self.sites.forward(l, "mlp.c_proj", None)
            return
        split(nn.matmul_forward, full.residual[l + 1], made("fch_gelu", l), b.fc_proj_w)
        out = mine.residual[l + 1]
        out += b.fc_proj_b
        out += resid2
        self.sites.forward(l, "mlp.c_proj", out)

    def attention_views(self, l):
        """-> for each of this worker's attention pieces (b0, b1, h0, h1): (h0, h1)
        and batch rows b0…b1 of layer l's qkv (rows, past + T, width: with the
        positions a KV cache holds), atty, lse (heads h0…h1), dqkv and datty (None
        when not training), each (rows, T, width)."""
        full, B, T = self.acts.full, self.B, self.T
        def rows(name, *layer):
            return full[name][layer].reshape(B, T, -1) if name in full else None
        qkv = full.qkv[l].reshape(B, self.acts.past + T, -1)  # with the cached positions'
        atty, dqkv, datty = rows("atty", l), rows("dqkv", l), rows("datty")
        lse = full.lse[l].reshape(B, self.cfg.n_head, T)
        for b0, b1, h0, h1 in self.pieces:
            yield ((h0, h1), qkv[b0:b1], atty[b0:b1], lse[b0:b1, h0:h1],
                   None if dqkv is None else dqkv[b0:b1], None if datty is None else datty[b0:b1])

    def backward(self):
        """Every gradient of the loss_scale given to forward into self.grads
        (overwritten), for a model alone with its rows."""
        tasks = self.trains.weight_tasks()
        def run(layer):
            for task in tasks:
                if task.layer == layer:
                    self.backward_weights(task, self.grads)
        self.backward_inputs(run)
        run(None)  # the embedding's

    def backward_inputs(self, layer_done):
        """After forward(loss_scale): the gradient of every activation of this
        worker's rows, layer by layer.  A layer's activation gradients (and with
        recompute its activations) last only until the next layer's backward:
        layer_done(l) runs the layer's weight gradients before then; the
        embedding's follow the last layer's."""
        nn, mine, p = self.layers, self.acts.mine, self.params
        L = self.cfg.n_layer
        nn.layernorm_backward(mine.dresidual[L], None, mine.dlnf, mine.residual[L], mine.lnf_mean, mine.lnf_rstd,
                              p["ln_f.weight"], mine.norm, mine.dnorm, mine.rowtmp)
        for l in reversed(range(L)):
            if self.acts.recompute and l < L - 1:  # the forward left the last layer's in place
                self.block_forward(l, self.blocks[l], again=True)
            self.block_backward(l, self.blocks[l])
            layer_done(l)

    def block_backward(self, l, b):
        """dresidual[l+1] -> dresidual[l] and the block's activation gradients."""
        nn, mine, full, made, split = self.layers, self.acts.mine, self.acts.full, self.acts.made, self.split
        ln_scratch = (mine.norm, mine.dnorm, mine.rowtmp)
        split(nn.matmul_backward, full.dfch[l], made("dresidual", l + 1), b.fc_proj_w, True)
        self.sites.backward(l, "mlp.c_proj", mine.dfch[l], self.acts.matmul_mine["dresidual"][l + 1])
        nn.gelu_backward(mine.dfch[l], mine.fch[l], mine.gelu_th, mine.gelu_slope)
        split(nn.matmul_backward, full.dln2[l], made("dfch", l), b.fc_w, True)
        self.sites.backward(l, "mlp.c_fc", mine.dln2[l], self.acts.matmul_mine["dfch"][l])
        nn.layernorm_backward(mine.dresid2[l], mine.dresidual[l + 1], mine.dln2[l], mine.resid2[l],
                              mine.ln2_mean[l], mine.ln2_rstd[l], b.ln_2_w, *ln_scratch)
        split(nn.matmul_backward, full.datty, made("dresid2", l), b.attn_proj_w, True)
        if self.sites.backward(l, "attn.c_proj", mine.datty, self.acts.matmul_mine["dresid2"][l]):
            self.sync()  # attention may read other workers' rows of datty
        for heads, qkv, atty, lse, dqkv, datty in self.attention_views(l):
            nn.attention_backward(dqkv, datty, qkv, atty, lse, self.cfg.n_head, heads_of=heads)
        self.sync()  # all of dqkv is in before this worker converts its rows
        split(nn.matmul_backward, full.dln1[l], made("dqkv", l), b.attn_w, True)
        self.sites.backward(l, "attn.c_attn", mine.dln1[l], self.acts.matmul_mine["dqkv"][l])
        nn.layernorm_backward(mine.dresidual[l], mine.dresid2[l], mine.dln1[l], mine.residual[l],
                              mine.ln1_mean[l], mine.ln1_rstd[l], b.ln_1_w, *ln_scratch)

    def backward_weights(self, task, grads):
        """One of what trains' weight-gradient tasks into the views `grads`
        (overwritten), from the rows of every worker; run once backward_inputs has
        finished on all of them."""
        self.sites.weights_backward(task, grads)

    def matrix_weights_backward(self, task, grads):
        """One of weight_tasks' tasks (see backward_weights)."""
        nn, full, low = self.layers, self.acts.full, self.acts.matmul_inputs
        if task.name == "wte":  # the head wrote this slice of dwte (see head_slices)
            lo, dwte = task.lo, grads["wte.weight"][task.lo:task.hi]
            dresidual0 = full.dresidual[0].reshape(*self.idx_all.shape, self.cfg.n_embd)
            nn.encoder_backward(dwte, grads["wpe.weight"] if lo == 0 else None, dresidual0, self.idx_all, lo)
            if lo == 0:
                nn.layernorm_weights_backward(grads["ln_f.weight"], grads["ln_f.bias"], full.dlnf,
                                              full.residual[self.cfg.n_layer], full.lnf_mean, full.lnf_rstd,
                                              self.norm_all)
            return
        l, matrix, h, lo, hi = task.layer, MATRICES[task.name], f"h.{task.layer}.", task.lo, task.hi
        dout, width = full[matrix.dout][l + matrix.dout_layer], full[matrix.dout].shape[-1]
        low_dout = low[matrix.dout][l + matrix.dout_layer].reshape(-1, width)
        inp = low[matrix.inp][l]
        nn.matmul_weights_backward(grads[h + task.name + ".weight"][lo:hi], low_dout,
                                   inp.reshape(-1, inp.shape[-1])[:, lo:hi])
        if lo > 0:
            return
        nn.bias_backward(grads[h + task.name + ".bias"], dout.reshape(-1, width))
        if matrix.layernorm:
            name, dln, x, mean, rstd = matrix.layernorm
            nn.layernorm_weights_backward(grads[h + name + ".weight"], grads[h + name + ".bias"], full[dln][l],
                                          full[x][l], full[mean][l], full[rstd][l], self.norm_all)
