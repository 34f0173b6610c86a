"""Text generation with a key/value cache: the prompt is run once, then each
new token costs one position (the model family's CachedModel)."""
import numpy as np

from trainer.corpus import EOT


class Sampler:
    """engine: the GEMM engine it multiplies on (default NumPy's fp32 BLAS, the
    coordinator's)."""

    def __init__(self, cfg, params, engine=None):
        from trainer.gemm import Engine
        from trainer.model import Layers
        from trainer.models import family_of
        self.cfg = cfg
        self.model = family_of(cfg).CachedModel(cfg, params, Layers(engine or Engine("numpy")))

    def forward(self, tokens, start):
        """Run positions start … start+n−1 (earlier ones are cached) -> logits (V,) of the last."""
        return self.model.forward(tokens, start)

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
