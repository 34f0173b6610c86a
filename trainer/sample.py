"""Text generation with a key/value cache: the prompt is run once, then each
new token costs one position.  The model is the family's own (the forward that
trains), over a trainer.activations.KVCache."""
import numpy as np

from trainer.activations import KVCache, Table
from trainer.gemm import Engine
from trainer.model import Layers
from trainer.models import family_of, in_arena
from trainer.trainable import Full, Weights


class Sampler:
    """params: {name: fp32 array} of the model `cfg`; engine: the GEMM engine it
    multiplies on (default NumPy's fp32 BLAS, the coordinator's)."""

    def __init__(self, cfg, params, engine=None):
        self.cfg, self.layers = cfg, Layers(engine or Engine("numpy"))
        trains = Full(cfg)
        self.weights = Weights(in_arena(cfg, params), trains)
        self.cache = KVCache(Table(cfg, trains, 1, cfg.block_size, False), self.layers.engine)
        self.logits = np.empty(cfg.vocab_size, dtype=np.float32)

    def forward(self, tokens, start):
        """Run positions start … start+n−1 (earlier ones are cached) -> logits (V,) of the last."""
        n = len(tokens)
        model = family_of(self.cfg).Model(self.cfg, 1, n, self.weights, layers=self.layers,
                                          acts=self.cache.at(start, n))
        model.load_batch(np.append(np.asarray(tokens, dtype=np.int64), 0))  # no target is read
        return model.next_logits(self.logits)

    def generate(self, prompt, max_new_tokens, temperature, top_k, seed):
        """prompt: token ids (at least one) -> the new token ids.  temperature 0 is greedy."""
        rng = np.random.default_rng(seed)
        T = self.cfg.block_size
        tokens = list(prompt)
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


def sample_text(cfg, params, tokenizer, prompt, max_new_tokens=64, temperature=1.0, top_k=40, seed=1337):
    """tokenizer: the model's (trainer.tokenizer); an empty prompt starts from its
    start token (GPT-2's <|endoftext|>, a tokenizer.json's BOS or EOS)."""
    ids = tokenizer.encode(prompt) or [tokenizer.start]
    return tokenizer.decode(Sampler(cfg, params).generate(ids, max_new_tokens, temperature, top_k, seed))
