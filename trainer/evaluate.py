"""`launch eval`: a model's mean cross-entropy on a token file, in this process,
through the family's own forward (the one that trains), window by window as a
run's evaluation reads them: window w is B·T+1 tokens from token w·B·T."""
import math

from trainer.data import WindowOrder
from trainer.gemm import Engine
from trainer.model import Layers
from trainer.models import family_of, in_arena
from trainer.trainable import Full, Weights


def mean_loss(cfg, params, data, batch_size, seq_len, windows=0):
    """params: {name: fp32 array} of the model `cfg`; data: a trainer.data.TokenData;
    windows: how many B×T windows to read (0: every whole window of the file)
    -> (mean −log p(target) over the targets they count, windows read).  The
    tokens are checked (trainer.data.check_tokens) by the caller."""
    n = batch_size * seq_len
    order = WindowOrder(data.tokens.size, n)
    windows = windows or order.per_pass
    model = family_of(cfg).Model(cfg, batch_size, seq_len, Weights(in_arena(cfg, params), Full(cfg)),
                                 layers=Layers(Engine("numpy")))
    total, counted = 0.0, 0
    for window in range(windows):
        first = order.start(window)
        tokens, mask, positions = data.window(first, n)
        model.load_batch(tokens, (0, 0), mask, positions)
        total += model.forward()
        counted += data.targets(first, n)
    return total / max(1, counted), windows


def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf
