"""AdamW (torch.optim.AdamW semantics), global-norm clipping and the LR schedule."""
import math

import numpy as np

BLOCK = 1 << 16  # floats per cache block: 4 arrays × 256 KB stay in L2


def lr_at(step, lr, schedule, warmup, steps, min_lr):
    """LR for optimizer step `step` (1-based): linear warmup over `warmup` steps,
    then constant or cosine from lr down to min_lr at the last step."""
    it = step - 1
    if it < warmup:
        return lr * (it + 1) / warmup
    if schedule == "constant":
        return lr
    ratio = (it - warmup) / max(1, steps - 1 - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (lr - min_lr)


def clip_scale(grad_norm, max_norm):
    """torch.nn.utils.clip_grad_norm_: grads are multiplied by min(1, max/(norm+1e-6))."""
    if not max_norm or max_norm <= 0:
        return 1.0
    return float(min(np.float32(1.0), np.float32(max_norm) / np.float32(grad_norm + 1e-6)))


def adamw_update(p, g, m, v, tmp, *, lr, t, beta1, beta2, eps, weight_decay, grad_scale):
    """One AdamW step over flat float32 slices, block by block so each block
    is read from memory once.  g is scaled in place by grad_scale (clipping);
    tmp is a scratch of at least BLOCK floats."""
    step_size = lr / (1.0 - beta1 ** t)
    inv_bc2_sqrt = 1.0 / math.sqrt(1.0 - beta2 ** t)
    decay = 1.0 - lr * weight_decay
    for s in range(0, p.size, BLOCK):
        e = min(s + BLOCK, p.size)
        pb, gb, mb, vb, tb = p[s:e], g[s:e], m[s:e], v[s:e], tmp[:e - s]
        if grad_scale != 1.0:
            gb *= np.float32(grad_scale)
        mb *= np.float32(beta1)
        np.multiply(gb, np.float32(1.0 - beta1), out=tb)
        mb += tb
        vb *= np.float32(beta2)
        np.multiply(gb, gb, out=tb)
        tb *= np.float32(1.0 - beta2)
        vb += tb
        np.sqrt(vb, out=tb)
        tb *= np.float32(inv_bc2_sqrt)
        tb += np.float32(eps)
        np.divide(mb, tb, out=tb)
        tb *= np.float32(step_size)
        if weight_decay:
            pb *= np.float32(decay)
        pb -= tb
