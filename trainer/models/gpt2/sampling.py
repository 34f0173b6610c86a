"""GPT-2 one position at a time, with a key/value cache: the prompt runs once, then
each new token costs one position (trainer/sample.py drives it).  The layers are
trainer/model.py's own forward functions (`layers`: trainer.model.Layers), on one
row of the cache's width."""
import numpy as np

from trainer.params import Layout


class CachedModel:
    """forward(tokens, start) -> the logits of the last of positions start…, the
    keys and values of earlier ones read from the cache."""

    def __init__(self, cfg, params, layers):
        self.cfg, self.p, self.layers = cfg, params, layers
        T, C, L, NH = cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head
        self.layout = Layout([
            ("x", (T, C)), ("ln", (T, C)), ("mean", (T, 1)), ("rstd", (T, 1)),
            ("qkv", (L, 1, T, 3 * C)),  # the cache: keys and values of every position so far
            ("lse", (1, NH, T)), ("atty", (T, C)), ("resid", (T, C)),
            ("fch", (T, 4 * C)), ("gelu", (T, 4 * C)), ("logits", (cfg.vocab_size,)),
        ])
        self.arena, self.a = self.layout.allocate()

    def forward(self, tokens, start):
        """Run positions start … start+n−1 (earlier ones are cached) -> logits (V,) of the last."""
        cfg, p, a, nn = self.cfg, self.p, self.a, self.layers
        n, C, end = len(tokens), cfg.n_embd, start + len(tokens)
        x, ln, mean, rstd = a["x"][:n], a["ln"][:n], a["mean"][:n], a["rstd"][:n]
        np.take(p["wte.weight"], np.asarray(tokens), axis=0, out=x)
        x += p["wpe.weight"][start:end]
        for l in range(cfg.n_layer):
            h = f"h.{l}."
            nn.layernorm_forward(ln, mean, rstd, x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            qkv = a["qkv"][l][:, :end]
            nn.matmul_forward(qkv[0, start:], ln, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
            atty = a["atty"][:n]
            nn.attention_forward(atty.reshape(1, n, C), a["lse"][:, :, :n], qkv, cfg.n_head, start)
            resid = a["resid"][:n]
            nn.matmul_forward(resid, atty, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
            resid += x
            nn.layernorm_forward(ln, mean, rstd, resid, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            nn.matmul_forward(a["fch"][:n], ln, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
            nn.gelu_forward(a["gelu"][:n], a["fch"][:n])
            nn.matmul_forward(x, a["gelu"][:n], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
            x += resid
        nn.layernorm_forward(ln[:1], mean[:1], rstd[:1], x[n - 1:], p["ln_f.weight"], p["ln_f.bias"])
        np.matmul(p["wte.weight"], ln[0], out=a["logits"])
        return a["logits"]
