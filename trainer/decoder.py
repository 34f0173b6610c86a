"""What every model family's decoder shares, for B rows of T tokens: the batch, the
forward's outline (the blocks, the final norm, the lm head), the head fused with
cross-entropy, attention's share of (row, head) pairs, and the backward's outline.
A family's model (trainer/models/*/model.py) subclasses `Decoder` and supplies its
blocks: `blocks_of`, `embed`, `block_forward`, `block_backward`, `final_norm`,
`final_norm_backward` and `matrix_weights_backward`, each over trainer/model.py's
(and trainer/llama_layers.py's) layers.

Every matmul goes through `split`, a hook the parallel strategy supplies: alone (one
process, or data parallelism) it is the plain matmul; the hybrid strategy runs each
worker's share of it over the rows of every worker, between barriers.  Before a
matmul reads an activation, this worker makes the bf16 copy of its own rows
(`Activations.made`; nothing without bf16).  Row-wise layers run on this worker's
token rows; attention on its share of the (batch row, head) pairs, which are the
same rows when the workers divide the batch, and otherwise need `sync` (a barrier)
before and after it.

Weight gradients are cut into tasks, one ordered list the strategies share (the
family's `weight_tasks`): the hybrid strategy balances them over workers, data
parallelism groups them into its reduction buckets.
"""
import numpy as np

from trainer.activations import Activations, Table, rows_of, share
from trainer.model import ALONE


def attention_pieces(B, n_head, part, n_parts, group=1):
    """Worker `part`'s share of the B·n_head (row, head) pairs, contiguous in row
    order, as rectangles [(b0, b1, h0, h1)]: whole rows where it can.  group: query
    heads that share a K/V head (grouped-query attention), which stay together."""
    units = n_head // group
    lo, hi = share(B * units, part, n_parts)
    pieces = []
    while lo < hi:
        b, h = divmod(lo, units)
        if h == 0 and hi - lo >= units:
            rows = (hi - lo) // units
            pieces.append((b, b + rows, 0, units))
        else:
            pieces.append((b, b + 1, h, min(units, h + hi - lo)))
        lo += (pieces[-1][1] - b) * (pieces[-1][3] - h)
    return [(b0, b1, h0 * group, h1 * group) for b0, b1, h0, h1 in pieces]


class Decoder:
    """The model for B rows of T tokens (every worker's, when a pool shares the
    activation table `acts`; this worker's share of them is acts.tokens).
    weights (trainer.trainable.Weights): the parameters' views, what trains (every
    parameter, or LoRA's adapters at its matrix sites: `sites`) and their bf16
    copies (which turn on bf16 matmuls); grads (views of what trains), to train.
    acts is allocated here when not given (recompute: keep only each block's input
    and run the block's forward again inside its backward; a given table says
    itself).  parallel (trainer.model.Parallel): the matmul split and the barrier
    attention needs when the workers split a batch row (see above).
    layers: trainer.model.Layers (its layers with the GEMM engine they multiply on),
    or a stand-in with the same functions (the profiler's)."""
    MATRICES = {}  # the family's matrix sites, for what trains beside them
    HEAD = None  # the parameter the lm head multiplies by

    def __init__(self, cfg, B, T, weights, grads=None, *, layers, acts=None, parallel=ALONE, recompute=False):
        if T > cfg.block_size:
            raise ValueError(f"seq-len {T} is above the model's context of {cfg.block_size}")
        self.cfg, self.B, self.T, self.params, self.grads = cfg, B, T, weights.params, grads
        self.split, self.layers = parallel.split, layers
        self.trains = weights.trains
        training = grads is not None
        if acts is None:
            acts = Activations(Table(cfg, self.trains, B, T, training, recompute), layers.engine,
                               low_dtype=None if weights.low is None else layers.engine.low_dtype)
        self.acts = acts
        self.weights = self.params if weights.low is None else weights.low  # what matmuls read
        self.blocks = self.blocks_of(self.params, self.weights)
        if training:  # norm weight gradients normalise the rows of all workers
            self.norm_all = np.zeros((B * T, cfg.n_embd), dtype=np.float32)
        self.rows = np.arange(B * T)
        self.idx_all = np.zeros((B, T), dtype=np.int64)
        self.first, end = acts.tokens
        self.idx = self.idx_all.reshape(-1)[self.first:end]
        self.targets_all = np.zeros(B * T, dtype=np.int64)
        # chat data (load_batch's mask and positions): which targets count, each token's
        # position in its example, and the first token of its example (what it attends from)
        self.documents = False
        self.counted_all = np.ones(B * T, dtype=bool)
        self.positions_all, self.starts_all = (np.zeros((B, T), dtype=np.int64) for _ in range(2))
        self.row_positions = np.arange(T)  # a plain row's positions
        self.kv_heads = cfg.n_kv_head
        self.pieces = attention_pieces(B, cfg.n_head, acts.part, acts.n_parts, cfg.n_head // self.kv_heads)
        self.sync = parallel.sync if B % acts.n_parts else lambda: None
        self.head_slices = self.trains.head_rows()  # the head weight's rows whose gradient this worker computes
        self.batch_key = (0, 0)  # (micro-batch, first token row): what per-batch draws (dropout) key on
        self.sites = self.trains.sites(self, weights)

    def load_batch(self, tokens, key=(0, 0), mask=None, positions=None):
        """tokens: the consecutive token ids of every worker's rows, plus one (any int
        dtype); key: (micro-batch, first token row in the global batch).  Chat data
        (trainer/data.py) also gives mask, which targets the loss counts, and
        positions, which restart at each example, each attending only to its own."""
        self.idx_all.reshape(-1)[...] = tokens[:self.idx_all.size]
        self.targets_all[...] = tokens[1:self.idx_all.size + 1]
        self.batch_key = key
        was, self.documents = self.documents, positions is not None
        if self.documents:
            np.not_equal(mask, 0, out=self.counted_all)
            self.positions_all.reshape(-1)[...] = positions
            np.subtract(self.row_positions, self.positions_all, out=self.starts_all)
            np.maximum(self.starts_all, 0, out=self.starts_all)  # a row that begins inside an example
            self.positions_loaded()
        elif was:  # plain text after chat data (--val-data): the rows' own positions again
            self.positions_all[...] = self.row_positions
            self.positions_loaded()

    def positions_loaded(self):
        """What the family computes from positions_all once per batch (Llama: RoPE's angles)."""

    def my_positions(self):
        """The positions of this worker's token rows (chat data's, from positions_all)."""
        return self.positions_all.reshape(-1)[self.first:self.first + self.idx.size]

    def forward(self, loss_scale=None, grads=None):
        """-> Σ of −log p(target) over this worker's share of the rows (see head).
        Training (loss_scale given): also the lm head's gradients, fused with it:
        dlnf, and this worker's head_slices of grads[HEAD] (default self.grads),
        for backward_inputs to go on from."""
        self.sites.start(loss_scale is not None)
        self.blocks_forward()
        self.final_norm(0, self.acts.mine.lnf.shape[0])
        return self.head(loss_scale, self.grads if grads is None else grads)

    def blocks_forward(self):
        """The embeddings of this worker's token rows, then every block: residual[0]
        -> residual[L].  Positions count from acts.past (the rows a KV cache holds)."""
        self.embed()
        for l, block in enumerate(self.blocks):
            self.block_forward(l, block)

    def next_logits(self, out):
        """Sampling (acts: a trainer.activations.KVCache's rows, which keep every
        layer's keys and values): out (V,) = the logits of the token after the last
        row loaded (load_batch)."""
        self.blocks_forward()
        self.final_norm(self.T - 1, self.T)
        np.matmul(self.params[self.HEAD], self.acts.mine.lnf[0], out=out)
        return out

    def head(self, loss_scale, grads):
        """The lm head and cross-entropy, a chunk of rows at a time (Liger Kernel's
        fused linear cross-entropy): the N x V logits are never all in memory.  Each
        chunk's logits are a split matmul over the rows of every worker; this worker
        takes the softmax of its share of the chunk's rows.  -> Σ −log p over those
        shares.  With loss_scale, also each chunk's dlogits, dlnf of its rows, and,
        added up over chunks, grads[HEAD] of this worker's head_slices of the vocabulary."""
        nn, full, acts = self.layers, self.acts.full, self.acts
        lnf, head, part, n_parts = acts.made("lnf"), self.weights[self.HEAD], acts.part, acts.n_parts
        N, chunk, loss = lnf.shape[0], full.logits.shape[0], 0.0
        for first in range(0, N, chunk):
            end = min(first + chunk, N)
            logits = full.logits[:end - first]
            self.split(nn.lmhead_forward, logits, lnf[first:end], head, True)
            share, targets, counted = (rows_of(x, 0, part, n_parts) for x in
                                       (logits, self.targets_all[first:end], self.counted_all[first:end]))
            rows, counted = self.rows[:share.shape[0]], counted if self.documents else None
            loss += nn.crossentropy_forward(share, targets, acts.mine.rowtmp[:rows.size], rows, counted)
            if loss_scale is None:
                continue
            nn.crossentropy_backward(share, targets, rows, loss_scale, counted)
            dlogits = acts.made_first("logits", end - first)
            self.split(nn.lmhead_backward, full.dlnf[first:end], dlogits, head)
            for lo, hi in self.head_slices:  # every worker's dlogits are in (the split's barrier)
                nn.lmhead_weights_backward(grads[self.HEAD][lo:hi], dlogits[:, lo:hi], lnf[first:end],
                                           accumulate=first > 0)
        return loss

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
        for b0, b1, h0, h1, starts in self.attention_rows():
            yield ((h0, h1), qkv[b0:b1], atty[b0:b1], lse[b0:b1, h0:h1],
                   None if dqkv is None else dqkv[b0:b1], None if datty is None else datty[b0:b1], starts)

    def attention_rows(self):
        """This worker's pieces with the first key each query sees (None: causal):
        with chat data a batch row at a time, each row's examples its own."""
        if not self.documents:
            return [piece + (None,) for piece in self.pieces]
        return [(b, b + 1, h0, h1, self.starts_all[b]) for b0, b1, h0, h1 in self.pieces for b in range(b0, b1)]

    def attention_forward(self, l):
        """Layer l's attention on this worker's pieces, between syncs."""
        self.sync()  # every worker's rows of qkv are final
        for heads, qkv, atty, lse, _, _, starts in self.attention_views(l):
            self.layers.attention_forward(atty, lse, qkv, self.cfg.n_head, self.acts.past, heads_of=heads,
                                          n_kv_head=self.kv_heads, starts=starts)
        self.sync()  # all of atty is in before this worker converts its rows

    def attention_backward(self, l):
        """Layer l's attention backward on this worker's pieces (datty is in), then a sync."""
        for heads, qkv, atty, lse, dqkv, datty, starts in self.attention_views(l):
            self.layers.attention_backward(dqkv, datty, qkv, atty, lse, self.cfg.n_head, heads_of=heads,
                                           n_kv_head=self.kv_heads, starts=starts)
        self.sync()  # all of dqkv is in before this worker converts its rows

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
        L = self.cfg.n_layer
        self.final_norm_backward()
        for l in reversed(range(L)):
            if self.acts.recompute and l < L - 1:  # the forward left the last layer's in place
                self.block_forward(l, self.blocks[l], again=True)
            self.block_backward(l, self.blocks[l])
            layer_done(l)

    def backward_weights(self, task, grads):
        """One of what trains' weight-gradient tasks into the views `grads`
        (overwritten), from the rows of every worker; run once backward_inputs has
        finished on all of them."""
        self.sites.weights_backward(task, grads)
