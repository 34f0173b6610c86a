"""`launch eval`: a model's mean cross-entropy on a token file, in this process,
through the family's own forward (the one that trains), window by window as a
run's evaluation reads them: window w is B·T+1 tokens from token w·B·T."""
import math

from trainer.data import WindowOrder
from trainer.gemm import Engine
from trainer.model import Layers
from trainer.models import family_of, in_arena
from trainer.trainable import Full, Weights


def mean_loss(cfg, params, tokens, batch_size, seq_len, windows=0):
    """params: {name: fp32 array} of the model `cfg`; tokens: a token file's ids;
    windows: how many B×T windows to read (0: every whole window of the file)
    -> (mean −log p(target) over their tokens, windows read).  The tokens are
    checked (trainer.data.check_tokens) by the caller."""
    order = WindowOrder(tokens.size, batch_size * seq_len)
    windows = windows or order.per_pass
    model = family_of(cfg).Model(cfg, batch_size, seq_len, Weights(in_arena(cfg, params), Full(cfg)), layers=Layers(Engine("numpy")))
    total = 0.0
    for window in range(windows):
        first = order.start(window)
        model.load_batch(tokens[first:first + batch_size * seq_len + 1])  # read into the model's int64 ids
        total += model.forward()
    return total / (windows * batch_size * seq_len), windows


def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf
