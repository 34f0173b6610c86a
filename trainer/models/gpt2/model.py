"""GPT-2's model: its blocks' forward and backward (LayerNorm, the fused c_attn, GELU),
learned positions, the head tied to wte and the ordered weight-gradient tasks, over
trainer/model.py's layers; the outline every family shares (the batch, the head
fused with cross-entropy, attention's pieces, the backward's order) is
trainer/decoder.py's.
"""
from typing import NamedTuple

import numpy as np

from trainer.decoder import Decoder
from trainer.model import WeightTask


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


class GPT(Decoder):
    """GPT-2 for B rows of T tokens (trainer.decoder.Decoder: the arguments, the
    forward and backward's outline): its blocks, learned positions, LayerNorm and
    the head tied to wte."""
    MATRICES = MATRICES  # the matrix sites, for what trains beside them
    HEAD = "wte.weight"

    def blocks_of(self, params, weights):
        return blocks_of(self.cfg, params, weights)

    def embed(self):
        p, past = self.params, self.acts.past
        at = self.my_positions() if self.documents else None
        self.layers.encoder_forward(self.acts.mine.residual[0], self.idx, p["wte.weight"], p["wpe.weight"],
                                    past + self.first, past + self.T, at)

    def final_norm(self, first, end):
        """lnf[:end − first] of this worker's rows first…end of the last block's output."""
        mine, p, n = self.acts.mine, self.params, end - first
        self.layers.layernorm_forward(mine.lnf[:n], mine.lnf_mean[:n], mine.lnf_rstd[:n],
                                      mine.residual[self.cfg.n_layer][first:end], p["ln_f.weight"], p["ln_f.bias"])

    def final_norm_backward(self):
        mine, L = self.acts.mine, self.cfg.n_layer
        self.layers.layernorm_backward(mine.dresidual[L], None, mine.dlnf, mine.residual[L], mine.lnf_mean,
                                       mine.lnf_rstd, self.params["ln_f.weight"], mine.norm, mine.dnorm, mine.rowtmp)

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
        self.attention_forward(l)
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
        self.attention_backward(l)
        split(nn.matmul_backward, full.dln1[l], made("dqkv", l), b.attn_w, True)
        self.sites.backward(l, "attn.c_attn", mine.dln1[l], self.acts.matmul_mine["dqkv"][l])
        nn.layernorm_backward(mine.dresidual[l], mine.dresid2[l], mine.dln1[l], mine.residual[l],
                              mine.ln1_mean[l], mine.ln1_rstd[l], b.ln_1_w, *ln_scratch)

    def matrix_weights_backward(self, task, grads):
        """One of weight_tasks' tasks (see backward_weights)."""
        nn, full, low = self.layers, self.acts.full, self.acts.matmul_inputs
        if task.name == "wte":  # the head wrote this slice of dwte (see head_slices)
            lo, dwte = task.lo, grads["wte.weight"][task.lo:task.hi]
            dresidual0 = full.dresidual[0].reshape(*self.idx_all.shape, self.cfg.n_embd)
            nn.encoder_backward(dwte, grads["wpe.weight"] if lo == 0 else None, dresidual0, self.idx_all, lo,
                                self.positions_all if self.documents else None)
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
