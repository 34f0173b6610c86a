"""Text generation with a key/value cache: the prompt is run once, then each
new token costs one position.  The layers are model.py's own forward functions."""
import numpy as np

from trainer.corpus import EOT
from trainer.model import attention_forward, gelu_forward, layernorm_forward, matmul_forward
from trainer.params import Layout


class Sampler:
    def __init__(self, cfg, params):
        self.cfg, self.p = cfg, params
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
        cfg, p, a = self.cfg, self.p, self.a
        n, C, end = len(tokens), cfg.n_embd, start + len(tokens)
        x, ln, mean, rstd = a["x"][:n], a["ln"][:n], a["mean"][:n], a["rstd"][:n]
        np.take(p["wte.weight"], np.asarray(tokens), axis=0, out=x)
        x += p["wpe.weight"][start:end]
        for l in range(cfg.n_layer):
            h = f"h.{l}."
            layernorm_forward(ln, mean, rstd, x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            qkv = a["qkv"][l][:, :end]
            matmul_forward(qkv[0, start:], ln, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
            atty = a["atty"][:n]
            attention_forward(atty.reshape(1, n, C), a["lse"][:, :, :n], qkv, cfg.n_head, start)
            resid = a["resid"][:n]
            matmul_forward(resid, atty, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
            resid += x
            layernorm_forward(ln, mean, rstd, resid, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            matmul_forward(a["fch"][:n], ln, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
            gelu_forward(a["gelu"][:n], a["fch"][:n])
            matmul_forward(x, a["gelu"][:n], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
            x += resid
        layernorm_forward(ln[:1], mean[:1], rstd[:1], x[n - 1:], p["ln_f.weight"], p["ln_f.bias"])
        np.matmul(p["wte.weight"], ln[0], out=a["logits"])
        return a["logits"]

    def generate(self, prompt, max_new_tokens, temperature, top_k, seed):
        """prompt: token ids -> the new token ids.  temperature 0 is greedy."""
        rng = np.random.default_rng(seed)
        T = self.cfg.block_size
        tokens = list(prompt) or [EOT]
        context = tokens[-T:]
        logits, pos, new = self.forward(context, 0), len(context), []
        for i in range(max_new_tokens):
            token = pick(logits, temperature, top_k, rng)
            new.append(token)
            tokens.append(token)
            if i == max_new_tokens - 1:
                break
            if pos == T:  # the cache is full: restart it from the last half context
                context = tokens[-(T // 2):]
                logits, pos = self.forward(context, 0), len(context)
            else:
                logits, pos = self.forward([token], pos), pos + 1
        return new


def pick(logits, temperature, top_k, rng):
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k and top_k < scaled.size:
        scaled[scaled < np.partition(scaled, -top_k)[-top_k]] = -np.inf
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def sample_text(cfg, params, prompt, max_new_tokens=64, temperature=1.0, top_k=40, seed=1337):
    from trainer.corpus import gpt2_encoding
    enc = gpt2_encoding()
    new = Sampler(cfg, params).generate(enc.encode(prompt), max_new_tokens, temperature, top_k, seed)
    return enc.decode(new)
