"""The Llama family's model (Llama, Qwen2): its blocks' forward and backward over
trainer/model.py's and trainer/llama_layers.py's layers: RMSNorm, the q, k, v
projections as one matmul (their weights lie back to back in the arena), rotary
positions, grouped-query attention, the SwiGLU MLP with gate and up as one matmul;
the head tied to the embedding or its own lm_head; the ordered weight-gradient
tasks.  The outline every family shares is trainer/decoder.py's.
"""
from typing import NamedTuple

import numpy as np

from trainer.decoder import Decoder
from trainer.llama_layers import rope_frequencies, rope_tables
from trainer.model import WeightTask
from trainer.models.llama.config import LINEARS, LLAMA3_KEYS, head_name, linear_shapes


class Site(NamedTuple):
    """A linear layer as LoRA beside it sees it: its input activation, its output's
    gradient (at layer l + dout_layer), and its columns of that output."""
    inp: str
    dout: str
    dout_layer: int
    columns: tuple


def sites_of(cfg):
    C, KV, F = cfg.n_embd, cfg.kv_width, cfg.n_ffn
    return {"self_attn.q_proj": Site("ln1", "dqkv", 0, (0, C)),
            "self_attn.k_proj": Site("ln1", "dqkv", 0, (C, C + KV)),
            "self_attn.v_proj": Site("ln1", "dqkv", 0, (C + KV, C + 2 * KV)),
            "self_attn.o_proj": Site("atty", "dresid2", 0, (0, C)),
            "mlp.gate_proj": Site("ln2", "dgateup", 0, (0, F)),
            "mlp.up_proj": Site("ln2", "dgateup", 0, (F, 2 * F)),
            "mlp.down_proj": Site("swiglu", "dresidual", 1, (0, C))}


class Fused(NamedTuple):
    """Linear layers computed as one matmul, as their weight gradient needs them."""
    parts: tuple  # the layers, in arena order
    inp: str
    dout: str
    dout_layer: int
    norm: tuple | None  # (parameter, dout, input, rstd) of the RMSNorm before them


FUSED = {"qkv": Fused(LINEARS[:3], "ln1", "dqkv", 0, ("input_layernorm", "dln1", "residual", "ln1_rstd")),
         "o": Fused(LINEARS[3:4], "atty", "dresid2", 0, None),
         "gateup": Fused(LINEARS[4:6], "ln2", "dgateup", 0, ("post_attention_layernorm", "dln2", "resid2", "ln2_rstd")),
         "down": Fused(LINEARS[6:], "swiglu", "dresidual", 1, None)}


def joined(views, names):
    """Tensors that lie back to back in one arena (param_shapes puts them so) -> one
    view over all of them, rows stacked."""
    first = views[names[0]]
    end = first.__array_interface__["data"][0]
    for name in names:
        view = views[name]
        if view.__array_interface__["data"][0] != end or view.shape[1:] != first.shape[1:]:
            raise ValueError(f"{name} does not follow {names[0]} in its arena")
        end += view.nbytes
    rows = sum(views[name].shape[0] for name in names)
    return np.lib.stride_tricks.as_strided(first, shape=(rows,) + first.shape[1:], strides=first.strides)


def fused_rows(cfg, fused, l, lo, hi):
    """Rows lo…hi of a fused matrix -> ((parameter, first row, end row), …) of its parts."""
    regions, start = [], 0
    for part in fused.parts:
        rows = linear_shapes(cfg)[part][0]
        if lo < start + rows and hi > start:
            regions.append((f"model.layers.{l}.{part}.weight", max(lo, start) - start, min(hi, start + rows) - start))
        start += rows
    return tuple(regions)


def weight_tasks(cfg, vocab_parts=1, matrix_parts=1):
    """Every weight-gradient task of a step in parameter-layout order: the embedding
    (and an untied lm_head) in vocab_parts slices of the vocabulary (a task named
    "embed"; its first slice also takes the final norm), each fused matrix in
    matrix_parts slices of its output rows (the first also takes its biases and the
    norm before it)."""
    C, V = cfg.n_embd, cfg.vocab_size
    cuts = [V * k // vocab_parts for k in range(vocab_parts + 1)]
    tasks = []
    for lo, hi in zip(cuts, cuts[1:]):
        params = (("model.embed_tokens.weight", lo, hi),) + ((("lm_head.weight", lo, hi),) if not cfg.tied else ())
        tasks.append(WeightTask("embed", None, lo, hi, (hi - lo) * C,
                                params + ((("model.norm.weight", 0, None),) if lo == 0 else ())))
    shapes = linear_shapes(cfg)
    for l in range(cfg.n_layer):
        p = f"model.layers.{l}."
        for name, fused in FUSED.items():
            rows, fan_in = sum(shapes[part][0] for part in fused.parts), shapes[fused.parts[0]][1]
            rest = tuple((p + part + ".bias", 0, None) for part in fused.parts if name == "qkv" and cfg.qkv_bias)
            rest += ((p + fused.norm[0] + ".weight", 0, None),) if fused.norm else ()
            cuts = [rows * k // matrix_parts for k in range(matrix_parts + 1)]
            for lo, hi in zip(cuts, cuts[1:]):
                tasks.append(WeightTask(name, l, lo, hi, (hi - lo) * fan_in,
                                        fused_rows(cfg, fused, l, lo, hi) + (rest if lo == 0 else ())))
    return tasks


class Block(NamedTuple):
    """One block's parameters; the matrices as matmuls read them (bf16 copies in bf16)."""
    norm_1_w: np.ndarray
    qkv_w: np.ndarray
    qkv_b: np.ndarray | None
    o_w: np.ndarray
    norm_2_w: np.ndarray
    gateup_w: np.ndarray
    down_w: np.ndarray


def blocks_of(cfg, params, weights):
    blocks = []
    for l in range(cfg.n_layer):
        p = f"model.layers.{l}."
        names = [p + part for part in LINEARS]
        blocks.append(Block(params[p + "input_layernorm.weight"], joined(weights, [n + ".weight" for n in names[:3]]),
                            joined(params, [n + ".bias" for n in names[:3]]) if cfg.qkv_bias else None,
                            weights[names[3] + ".weight"], params[p + "post_attention_layernorm.weight"],
                            joined(weights, [n + ".weight" for n in names[4:6]]), weights[names[6] + ".weight"]))
    return blocks


class Llama(Decoder):
    """A Llama-family model for B rows of T tokens (trainer.decoder.Decoder: the
    arguments, the forward and backward's outline)."""

    def __init__(self, cfg, B, T, weights, grads=None, **kwargs):
        self.MATRICES = sites_of(cfg)
        self.HEAD = head_name(cfg)
        super().__init__(cfg, B, T, weights, grads, **kwargs)
        # the angles of this worker's token rows: positions restart at each batch row
        positions = self.acts.past + (self.first + np.arange(self.idx.size)) % T
        scaling = None if cfg.rope_scaling is None else dict(zip(LLAMA3_KEYS, cfg.rope_scaling))
        self.cos, self.sin = (np.empty((positions.size, cfg.head_size // 2), dtype=np.float32) for _ in range(2))
        self.inv_freq = rope_frequencies(cfg.head_size, cfg.rope_theta, scaling)
        rope_tables(self.cos, self.sin, positions, self.inv_freq)

    def positions_loaded(self):
        """Chat data: the angles of each token's position in its example."""
        rope_tables(self.cos, self.sin, self.my_positions(), self.inv_freq)

    def blocks_of(self, params, weights):
        return blocks_of(self.cfg, params, weights)

    def embed(self):
        np.take(self.params["model.embed_tokens.weight"], self.idx, axis=0, out=self.acts.mine.residual[0])

    def final_norm(self, first, end):
        """lnf[:end − first] of this worker's rows first…end of the last block's output."""
        mine, n = self.acts.mine, end - first
        self.layers.rmsnorm_forward(mine.lnf[:n], mine.lnf_rstd[:n], mine.residual[self.cfg.n_layer][first:end],
                                    self.params["model.norm.weight"], self.cfg.rms_eps)

    def final_norm_backward(self):
        mine, L = self.acts.mine, self.cfg.n_layer
        self.layers.rmsnorm_backward(mine.dresidual[L], None, mine.dlnf, mine.residual[L], mine.lnf_rstd,
                                     self.params["model.norm.weight"], mine.norm, mine.dnorm, mine.rowtmp)

    def rotate(self, qkv, back=False):
        """This worker's rows of q and k (in qkv, (n, C + 2·KV)) turned by their
        positions' angles (back: the gradient turned back)."""
        cfg, n = self.cfg, qkv.shape[0]
        hs, tmp = cfg.head_size, self.acts.mine.rope_tmp[:n]
        turn = self.layers.rope_backward if back else self.layers.rope_forward
        turn(qkv[:, :cfg.n_embd].reshape(n, cfg.n_head, hs), self.cos, self.sin, tmp.reshape(n, cfg.n_head, hs))
        k = qkv[:, cfg.n_embd:cfg.n_embd + cfg.kv_width].reshape(n, cfg.n_kv_head, hs)
        turn(k, self.cos, self.sin, tmp[:, :cfg.kv_width].reshape(n, cfg.n_kv_head, hs))

    def columns(self, rows, target):
        return rows[:, slice(*self.MATRICES[target].columns)]

    def block_forward(self, l, b, again=False):
        """residual[l] -> residual[l+1].  again: the recompute inside the backward,
        which stops at what the backward reads."""
        nn, mine, full, made, split = self.layers, self.acts.mine, self.acts.full, self.acts.made, self.split
        past, eps, F = self.acts.past, self.cfg.rms_eps, self.cfg.n_ffn
        nn.rmsnorm_forward(mine.ln1[l], mine.ln1_rstd[l], mine.residual[l], b.norm_1_w, eps)
        split(nn.linear_forward, full.qkv[l][past:], made("ln1", l), b.qkv_w, True)
        rows_qkv = mine.qkv[l][past:]
        if b.qkv_b is not None:
            rows_qkv += b.qkv_b
        for target in LINEARS[:3]:
            self.sites.forward(l, target, self.columns(rows_qkv, target))
        self.rotate(rows_qkv)
        self.attention_forward(l)
        split(nn.linear_forward, full.resid2[l], made("atty", l), b.o_w, True)
        resid2 = mine.resid2[l]
        resid2 += mine.residual[l]
        self.sites.forward(l, "self_attn.o_proj", resid2)
        nn.rmsnorm_forward(mine.ln2[l], mine.ln2_rstd[l], resid2, b.norm_2_w, eps)
        split(nn.linear_forward, full.gateup[l], made("ln2", l), b.gateup_w, True)
        gateup = mine.gateup[l]
        for target in LINEARS[4:6]:
            self.sites.forward(l, target, self.columns(gateup, target))
        nn.swiglu_forward(mine.swiglu[l], gateup[:, :F], gateup[:, F:])
        if again:  # the backward reads swiglu's bf16 copy, and u of the projection after it
            made("swiglu", l)
            self.sites.forward(l, "mlp.down_proj", None)
            return
        split(nn.linear_forward, full.residual[l + 1], made("swiglu", l), b.down_w, True)
        out = mine.residual[l + 1]
        out += resid2
        self.sites.forward(l, "mlp.down_proj", out)

    def block_backward(self, l, b):
        """dresidual[l+1] -> dresidual[l] and the block's activation gradients."""
        nn, mine, full, made, split = self.layers, self.acts.mine, self.acts.full, self.acts.made, self.split
        low_mine, F = self.acts.matmul_mine, self.cfg.n_ffn
        scratch = (mine.norm, mine.dnorm, mine.rowtmp)
        split(nn.linear_backward, full.dswiglu, made("dresidual", l + 1), b.down_w)
        self.sites.backward(l, "mlp.down_proj", mine.dswiglu, low_mine["dresidual"][l + 1])
        gateup, dgateup = mine.gateup[l], mine.dgateup[l]
        nn.swiglu_backward(dgateup[:, :F], dgateup[:, F:], mine.dswiglu, gateup[:, :F], gateup[:, F:],
                           mine.swiglu_tmp)
        split(nn.linear_backward, full.dln2[l], made("dgateup", l), b.gateup_w)
        for target in LINEARS[4:6]:
            self.sites.backward(l, target, mine.dln2[l], self.columns(low_mine["dgateup"][l], target))
        nn.rmsnorm_backward(mine.dresid2[l], mine.dresidual[l + 1], mine.dln2[l], mine.resid2[l], mine.ln2_rstd[l],
                            b.norm_2_w, *scratch)
        split(nn.linear_backward, full.datty, made("dresid2", l), b.o_w)
        if self.sites.backward(l, "self_attn.o_proj", mine.datty, low_mine["dresid2"][l]):
            self.sync()  # attention may read other workers' rows of datty
        self.attention_backward(l)
        self.rotate(mine.dqkv[l], back=True)
        split(nn.linear_backward, full.dln1[l], made("dqkv", l), b.qkv_w)
        for target in LINEARS[:3]:
            self.sites.backward(l, target, mine.dln1[l], self.columns(low_mine["dqkv"][l], target))
        nn.rmsnorm_backward(mine.dresidual[l], mine.dresid2[l], mine.dln1[l], mine.residual[l], mine.ln1_rstd[l],
                            b.norm_1_w, *scratch)

    def matrix_weights_backward(self, task, grads):
        """One of weight_tasks' tasks (see backward_weights)."""
        nn, full, low, cfg = self.layers, self.acts.full, self.acts.matmul_inputs, self.cfg
        if task.name == "embed":
            self.embedding_weights_backward(task, grads)
            return
        l, fused, p = task.layer, FUSED[task.name], f"model.layers.{task.layer}."
        width = full[fused.dout].shape[-1]
        low_dout = low[fused.dout][l + fused.dout_layer].reshape(-1, width)
        inp = low[fused.inp][l]
        weight = joined(grads, [p + part + ".weight" for part in fused.parts])
        nn.linear_weights_backward(weight[task.lo:task.hi], low_dout[:, task.lo:task.hi],
                                   inp.reshape(-1, inp.shape[-1]))
        if task.lo > 0:
            return
        if task.name == "qkv" and cfg.qkv_bias:
            nn.bias_backward(joined(grads, [p + part + ".bias" for part in fused.parts]),
                             full[fused.dout][l].reshape(-1, width))
        if fused.norm:
            name, dln, x, rstd = fused.norm
            nn.rmsnorm_weights_backward(grads[p + name + ".weight"], full[dln][l], full[x][l], full[rstd][l],
                                        self.norm_all)

    def embedding_weights_backward(self, task, grads):
        """The embedding rows of the task's slice of the vocabulary (tied: added to
        what the head wrote there), and on the first slice the final norm's."""
        full, lo = self.acts.full, task.lo
        dembed = grads["model.embed_tokens.weight"][lo:task.hi]
        if not self.cfg.tied:
            dembed[...] = 0.0
        dresidual0 = full.dresidual[0].reshape(*self.idx_all.shape, self.cfg.n_embd)
        self.layers.encoder_backward(dembed, None, dresidual0, self.idx_all, lo)
        if lo == 0:
            self.layers.rmsnorm_weights_backward(grads["model.norm.weight"], full.dlnf,
                                                 full.residual[self.cfg.n_layer], full.lnf_rstd, self.norm_all)
