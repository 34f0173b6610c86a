"""An independent GPT-2 in PyTorch, written from the paper's equations with
torch's own layers, used only as the reference that coregpt is tested against."""
import math

import torch
import torch.nn.functional as F


def hf_shapes(n_layer, n_embd, vocab, n_ctx):
    C = n_embd
    shapes = {"wte.weight": (vocab, C), "wpe.weight": (n_ctx, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    return shapes


def random_state(n_layer, n_embd, vocab, n_ctx, seed):
    """Random weights with non-trivial LayerNorm gains and biases."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(n_layer, n_embd, vocab, n_ctx).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        state[name] = t.float().contiguous()
    return state


class TorchGPT2(torch.nn.Module):
    def __init__(self, state, n_layer, n_head):
        super().__init__()
        self.n_layer, self.n_head = n_layer, n_head
        self.p = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v.clone()) for k, v in state.items()})

    def w(self, name):
        return self.p[name.replace(".", "__")]

    def forward(self, idx, targets):
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def logits(self, idx):
        B, T = idx.shape
        C = self.w("wte.weight").shape[1]
        x = self.w("wte.weight")[idx] + self.w("wpe.weight")[:T]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(self.n_layer):
            h = f"h.{i}."
            a = F.layer_norm(x, (C,), self.w(h + "ln_1.weight"), self.w(h + "ln_1.bias"), 1e-5)
            qkv = a @ self.w(h + "attn.c_attn.weight") + self.w(h + "attn.c_attn.bias")
            q, k, v = qkv.split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.n_head)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + y @ self.w(h + "attn.c_proj.weight") + self.w(h + "attn.c_proj.bias")
            m = F.layer_norm(x, (C,), self.w(h + "ln_2.weight"), self.w(h + "ln_2.bias"), 1e-5)
            m = F.gelu(m @ self.w(h + "mlp.c_fc.weight") + self.w(h + "mlp.c_fc.bias"), approximate="tanh")
            x = x + m @ self.w(h + "mlp.c_proj.weight") + self.w(h + "mlp.c_proj.bias")
        x = F.layer_norm(x, (C,), self.w("ln_f.weight"), self.w("ln_f.bias"), 1e-5)
        return x @ self.w("wte.weight").T

    def optimizer(self, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
        decay = [p for p in self.p.values() if p.dim() == 2]
        no_decay = [p for p in self.p.values() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=betas, eps=eps)

    def state(self):
        return {k.replace("__", "."): v.detach().numpy() for k, v in self.p.items()}

    def grads(self):
        return {k.replace("__", "."): v.grad.numpy() for k, v in self.p.items()}
