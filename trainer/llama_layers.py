"""The Llama family's layers beyond GPT-2's, in trainer/model.py's style: RMSNorm,
rotary position embeddings (RoPE, as transformers applies them with rotate_half,
and Llama 3's frequency scaling) and the SwiGLU MLP's gate.  NumPy float32; every
function writes into buffers it is given.  Shapes: N rows (B·T tokens), C channels,
H heads of HS, T positions, F the MLP's width."""
import math

import numpy as np



def rmsnorm_forward(out, rstd, x, w, eps):
    """x (N,C) -> out (N,C) = x · rstd · w; saves rstd (N,1) = 1/√(mean(x²) + eps)."""
    np.einsum("nc,nc->n", x, x, out=rstd[:, 0])
    rstd /= np.float32(x.shape[1])
    rstd += np.float32(eps)
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    np.multiply(x, rstd, out=out)
    out *= w


def rmsnorm_backward(dx, dres, dout, x, rstd, w, norm, dnorm, rowtmp):
    """dout (N,C) -> dx (N,C) = dres + ∂/∂x (dres None: 0); norm, dnorm (N,C) and
    rowtmp (N,1) are scratch.  dx = rstd · (dnorm − norm · mean(dnorm · norm))."""
    np.multiply(x, rstd, out=norm)
    np.multiply(dout, w, out=dnorm)
    np.einsum("nc,nc->n", dnorm, norm, out=rowtmp[:, 0])
    rowtmp /= np.float32(x.shape[1])
    norm *= rowtmp
    norm_input_gradient(dx, dres, dnorm, norm, rstd)


def norm_input_gradient(dx, dres, dnorm, along, rstd):
    """The last step of a normalisation's backward (layernorm's, RMSNorm's): dx (N,C) =
    dres + rstd · (dnorm − along) (dres None: 0), dnorm the gradient through the weight
    less what the mean took, `along` its part along the normalised input; dnorm is spent."""
    dnorm -= along
    dnorm *= rstd
    if dres is None:
        np.copyto(dx, dnorm)
    else:
        np.add(dres, dnorm, out=dx)


def rmsnorm_weights_backward(dw, dout, x, rstd, norm):
    """dout, x (N,C) -> dw (C) overwritten; norm (N,C) scratch."""
    np.multiply(x, rstd, out=norm)
    norm *= dout
    np.sum(norm, axis=0, out=dw)


def rope_frequencies(head_size, theta, scaling=None):
    """-> (HS/2,) float32 inverse frequencies θ^(−2i/HS), as transformers computes them
    in float32; scaling: a config's rope_scaling of type llama3 (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings) or None."""
    exponents = np.arange(0, head_size, 2, dtype=np.float32) / np.float32(head_size)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponents, dtype=np.float32)
    if scaling is None:
        return inv_freq
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq.astype(np.float64)
    # long wavelengths divided by the factor, short ones kept, the band between interpolated
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    between = ~(wavelength < context / high) & ~(wavelength > context / low)
    return np.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)


def rope_tables(cos, sin, positions, inv_freq):
    """cos, sin (n, HS/2) <- of the angles p · inv_freq at the n positions p (the float32
    products, as transformers forms them; each half of a head shares them)."""
    angles = np.multiply.outer(np.asarray(positions, dtype=np.float32), inv_freq).astype(np.float32)
    np.cos(angles.astype(np.float64), out=cos, casting="same_kind")
    np.sin(angles.astype(np.float64), out=sin, casting="same_kind")


def rope_forward(x, cos, sin, tmp):
    """x (B,T,H,HS) rotated in place: x·cos + rotate_half(x)·sin, rotate_half(x) =
    (−x₂, x₁) of its halves; cos, sin (T, HS/2); tmp (B,T,H,HS) scratch."""
    rotate(x, cos, sin, tmp, back=False)


def rope_backward(dx, cos, sin, tmp):
    """dx (B,T,H,HS), the gradient of rope_forward's output, turned in place into its
    input's: each pair (x₁, x₂) was rotated by its angle, so it is rotated back."""
    rotate(dx, cos, sin, tmp, back=True)


def rotate(x, cos, sin, tmp, back):
    """Each pair (x₁, x₂) of x's halves turned by its angle (back: by minus it):
    x₁·c ∓ x₂·s, x₂·c ± x₁·s."""
    half = x.shape[-1] // 2
    x1, x2, t1, t2 = x[..., :half], x[..., half:], tmp[..., :half], tmp[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    np.multiply(x2, s, out=t1)
    np.multiply(x1, s, out=t2)
    x1 *= c
    x2 *= c
    if back:
        x1 += t1
        x2 -= t2
    else:
        x1 -= t1
        x2 += t2


def swiglu_forward(out, gate, up):
    """gate, up (N,F) -> out (N,F) = silu(gate) · up, silu(g) = g · σ(g)."""
    sigmoid(out, gate)
    out *= gate
    out *= up


def swiglu_backward(dgate, dup, dout, gate, up, tmp):
    """dout (N,F) -> dgate, dup (N,F): dup = dout · silu(g), dgate = dout · up ·
    (σ(g) + silu(g)·(1 − σ(g))); tmp (N,F) scratch."""
    sigmoid(tmp, gate)
    np.multiply(gate, tmp, out=dup)
    np.subtract(np.float32(1), tmp, out=dgate)
    dgate *= dup
    dgate += tmp
    dgate *= dout
    dgate *= up
    dup *= dout


def sigmoid(out, x):
    """out = σ(x) = (1 + tanh(x/2)) / 2: no overflow for any x."""
    np.multiply(x, np.float32(0.5), out=out)
    np.tanh(out, out=out)
    out += np.float32(1)
    out *= np.float32(0.5)


# nn.Linear's orientation: weights (out, in), as the Llama family stores them
def linear_forward(engine, out, inp, w):
    """out (N,out) = inp (N,in) @ w.T, w (out,in)."""
    engine.matmul(out, inp, w.T)


def linear_backward(engine, dinp, dout, w):
    """dout (N,out) -> dinp (N,in) = dout @ w, overwritten."""
    engine.matmul(dinp, dout, w)


def linear_weights_backward(engine, dw, dout, inp):
    """dout (N,out), inp (N,in) -> dw (out,in) = dout.T @ inp, overwritten."""
    engine.matmul(dw, dout.T, inp)


ENGINE_LAYERS = ("linear_forward", "linear_backward", "linear_weights_backward")
PLAIN_LAYERS = ("rmsnorm_forward", "rmsnorm_backward", "rmsnorm_weights_backward", "rope_forward", "rope_backward",
                "swiglu_forward", "swiglu_backward")
