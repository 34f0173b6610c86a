"""The GEMM engine: every matmul of the model's linear layers and lm head goes
through `matmul(out, a, b)`, out (M,N) float32 = a (M,K) @ b (K,N) (or += with
accumulate), where a and b may be transposed or column-sliced views (expressed to
BLAS as strides, never copied).

Engines, chosen once per run (`choose`) and built once per process (`Engine(name)`),
which then goes explicitly to whatever multiplies (trainer.model.Layers, attention's
Workspace, AdamW, the activation table):
  numpy         NumPy's BLAS (OpenBLAS, Accelerate...), fp32
  onednn        oneDNN's dnnl_sgemm, fp32 (faster than OpenBLAS on AVX-512 CPUs)
  onednn-bf16   bf16 inputs, fp32 accumulation and output: oneDNN's matmul primitive
                where the CPU has AMX (its brgemm kernels use the tile units), else
                dnnl_gemm_bf16bf16f32; fast only with bf16 units (AVX512_BF16, AMX)
  emulated-bf16 the same numerics anywhere: inputs rounded to bf16, then the fp32
                GEMM (onednn if it is fast here, else numpy); activations' copies
                are stored as float32, weights' as bf16 (half the memory, widened
                exactly a block at a time as a GEMM reads them)

bf16 operands are made by `to_low(dst, src)` where an activation or weight is
produced; the engine's `low_dtype` says how activations' are stored, `weight_dtype`
how weights' are.  `batched(out, a, b)`
is matmul for stacks of small matrices (attention's blocks, every (row, head) pair
at once): one oneDNN matmul primitive per call where oneDNN is loaded, else NumPy's.
`binary(out, op, a, b)` is one element-wise pass with post-ops (AdamW's fused update),
only where oneDNN is loaded.
oneDNN comes from the `onednn-cpu-gomp` wheel (`pip install 'coregpt[bf16]'`), loaded with ctypes."""
import ctypes
import glob
import os
import platform
import sys
import time

import numpy as np

from trainer.errors import EngineError
from trainer.onednn import ISA_AMX, ISA_AVX512_BF16, ISA_AVX512_CORE, OneDNN, one_batch_axis, operands

BF16_INSTALL = "pip install 'coregpt[bf16]'"
BLOCK = 1 << 16  # elements rounded per pass by the emulated engine (stays in L2)
WIDEN = 1 << 22  # floats of a bf16 weight the emulated engine widens for one fp32 GEMM (16 MB)
NUMPY_OPS = {"add": np.add, "mul": np.multiply, "div": np.divide, "sub": np.subtract}


class Cblas:
    """cblas_sgemm of the BLAS NumPy itself links (found through threadpoolctl), for
    the one GEMM NumPy has no call for: out += a @ b.  None where it cannot be found
    (then out += a @ b goes through a temporary)."""
    SYMBOLS = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
               ("cblas_sgemm", ctypes.c_int))
    ROW_MAJOR, TRANS = 101, {b"N": 111, b"T": 112}

    @classmethod
    def find(cls):
        from threadpoolctl import threadpool_info
        for lib in threadpool_info():
            if lib["user_api"] != "blas":
                continue
            try:
                handle = ctypes.CDLL(lib["filepath"])
            except OSError:
                continue
            for symbol, integer in cls.SYMBOLS:
                fn = getattr(handle, symbol, None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int] * 3 + [integer] * 3 + [
                        ctypes.c_float, ctypes.c_void_p, integer, ctypes.c_void_p, integer, ctypes.c_float,
                        ctypes.c_void_p, integer]
                    fn.restype = None
                    return cls(fn)
        return None

    def __init__(self, fn):
        self.fn = fn

    def gemm(self, out, a, b, beta):
        (ta, lda), (tb, ldb), ldc = operands(out, a, b)
        (M, K), N = a.shape, b.shape[1]
        self.fn(self.ROW_MAJOR, self.TRANS[ta], self.TRANS[tb], M, N, K, 1.0, a.ctypes.data, lda,
                b.ctypes.data, ldb, beta, out.ctypes.data, ldc)


def onednn_library():
    """Path of libdnnl.so.3 from an installed onednn-cpu-* wheel, or None."""
    from importlib import metadata
    for dist in ("onednn-cpu-gomp", "onednn-cpu-iomp"):
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name.startswith("libdnnl.so.3"):
                return str(f.locate())
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libdnnl.so.3*")))
    return found[0] if found else None


def onednn():
    """oneDNN, loaded (a library already loaded in this process is only counted once
    more), or EngineError saying how to get it."""
    path = onednn_library()
    if path is None:
        raise EngineError(f"oneDNN is not installed: {BF16_INSTALL}")
    return OneDNN(path)


def bf16_dtype():
    try:
        import ml_dtypes
    except ImportError:
        raise EngineError(f"--precision bf16 needs ml_dtypes and oneDNN: {BF16_INSTALL}") from None
    return np.dtype(ml_dtypes.bfloat16)


def onednn_wheel_exists():
    """The onednn-cpu-* wheels are built for Linux on x86-64 only."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def choose(precision, prefer="auto"):
    """-> (engine name, one-line description for the run header).  `prefer` is
    auto, numpy or onednn (the --gemm setting).  Raises EngineError."""
    if precision == "bf16":
        bf16_dtype()
        if not onednn_wheel_exists() and onednn_library() is None and prefer != "onednn":
            return "emulated-bf16", ("bf16 emulated: inputs rounded to bf16, fp32 GEMM by NumPy's "
                                     "BLAS (no oneDNN build for this platform); --precision fp32 is faster")
        dnn = onednn()
        if prefer == "numpy":
            return "emulated-bf16", "bf16 emulated: inputs rounded to bf16, fp32 GEMM by NumPy's BLAS"
        if dnn.has(ISA_AVX512_BF16):
            return "onednn-bf16", f"oneDNN {dnn.version} bf16 ({dnn.isa_name})"
        fp32 = "oneDNN sgemm" if dnn.has(ISA_AVX512_CORE) else "NumPy's BLAS"
        return "emulated-bf16", (f"bf16 emulated: inputs rounded to bf16, fp32 GEMM by {fp32}; this "
                                 f"CPU ({dnn.isa_name}) has no bf16 units, so --precision fp32 is faster")
    if prefer == "numpy":
        return "numpy", "NumPy's BLAS, fp32"
    try:
        dnn = onednn()
    except EngineError:
        if prefer == "onednn":
            raise
        return "numpy", "NumPy's BLAS, fp32"
    if prefer == "onednn" or dnn.has(ISA_AVX512_CORE):
        return "onednn", f"oneDNN {dnn.version} sgemm, fp32 ({dnn.isa_name})"
    return "numpy", "NumPy's BLAS, fp32"


class Engine:
    def __init__(self, name):
        self.name = name
        self.convert_seconds = 0.0  # spent in to_low: the profile's "convert" phase
        self.flops = 0  # of every product so far: the profile's GFLOP/s
        self.low_dtype = self.weight_dtype = np.dtype(np.float32)
        self.sgemm = None
        self.cblas = False  # not looked for yet
        if name in ("onednn", "emulated-bf16") and onednn_library():
            dnn = onednn()
            if name == "onednn" or dnn.has(ISA_AVX512_CORE):
                self.sgemm = dnn
        self.amx = False
        if name == "onednn-bf16":
            self.dnn = onednn()
            self.low_dtype = self.weight_dtype = bf16_dtype()
            # with AMX oneDNN's matmul primitive (brgemm on the tile units) runs GPT-2's
            # GEMMs 1.1-2.7x faster than dnnl_gemm_bf16bf16f32 (AVX512_BF16 only)
            self.amx = self.dnn.has(ISA_AMX)
        if name == "emulated-bf16":
            self.scratch = np.empty(BLOCK, dtype=bf16_dtype())
            self.weight_dtype = bf16_dtype()
            self.wide = np.empty(WIDEN, dtype=np.float32)  # a block of a weight, widened
        # stacks of small matmuls: oneDNN's primitive wherever this engine loaded oneDNN
        dnn = self.dnn if name == "onednn-bf16" else self.sgemm
        self.primitives = dnn.batched() if dnn is not None else None
        self.parts = {}

    @property
    def low(self):
        return self.name.endswith("bf16")

    @property
    def writes_low(self):
        """batched may write a bf16 `out` (rounded once, after its post-ops): oneDNN's
        bf16 engine; the emulated one writes float32 and rounds it with to_low."""
        return self.name == "onednn-bf16"

    def matmul(self, out, a, b, accumulate=False):
        beta = 1.0 if accumulate else 0.0
        if a.dtype != b.dtype:  # the emulated engine: b is a bf16 weight
            self.widened(out, a, b, accumulate)  # its blocks are counted as they multiply
            return
        self.flops += 2 * out.size * a.shape[-1]
        if a.dtype != np.float32 and self.amx:
            self.primitives.run(out, a, b, accumulate)
        elif a.dtype != np.float32:
            self.dnn.gemm(self.dnn.lib.dnnl_gemm_bf16bf16f32, out, a, b, beta)
        elif self.sgemm is not None:
            self.sgemm.gemm(self.sgemm.lib.dnnl_sgemm, out, a, b, beta)
        elif not accumulate:
            np.matmul(a, b, out=out)
        else:
            if self.cblas is False:
                self.cblas = Cblas.find()
            if self.cblas is not None:
                self.cblas.gemm(out, a, b, beta)
            else:
                out += a @ b

    def widened(self, out, a, b, accumulate):
        """out (+)= a @ b for a float32 and b a bf16 weight (or its transpose): b a
        block of WIDEN floats at a time, widened to float32 exactly (its rows where
        they are contiguous, summed into out; else its transpose's rows, columns of
        out), then the fp32 GEMM on it."""
        K, N = b.shape
        if K * N <= WIDEN:
            self.matmul(out, a, self.widen(b), accumulate)
        elif b.strides[0] == b.itemsize:  # a transposed weight
            step = max(1, WIDEN // K)
            for j in range(0, N, step):
                self.matmul(out[:, j:j + step], a, self.widen(b[:, j:j + step]), accumulate)
        else:
            step = max(1, WIDEN // N)
            for k in range(0, K, step):
                self.matmul(out, a[:, k:k + step], self.widen(b[k:k + step]), accumulate or k > 0)

    def widen(self, low):
        """A 2-D bf16 view -> the same values in float32, in the engine's scratch
        (bf16 is the top half of a float32: a shift, no rounding)."""
        flipped = low.strides[0] == low.itemsize and low.shape[0] > 1  # a transposed weight
        src = low.T if flipped else low
        wide = self.wide[:low.size].reshape(src.shape)
        np.left_shift(src.view(np.uint16), 16, out=wide.view(np.uint32), dtype=np.uint32)
        return wide.T if flipped else wide

    def batched(self, out, a, b, accumulate=False, scale=None, post=()):
        """out (...,M,N) = scale · a (...,M,K) @ b (...,K,N), then each element-wise op of
        `post` in turn ("exp", None) or (op, operand) with op add/sub/mul/div and the
        operand broadcast along its size-1 axes, then (with accumulate) += what out held;
        over the leading axes.  a and b strided views of one dtype (float32, or bf16
        copies); out any strided float32 view (or bf16 where oneDNN's bf16 engine runs)."""
        self.flops += 2 * out.size * a.shape[-1]
        if self.primitives is not None:
            flat = one_batch_axis([out, a, b] + [x for _, x in post if x is not None])
            if flat is not None:  # oneDNN broadcasts an operand over one batch axis at speed, not two
                out, a, b, rest = flat[0], flat[1], flat[2], iter(flat[3:])
                post = [(op, None if x is None else next(rest)) for op, x in post]
            self.primitives.run(out, a, b, accumulate, None if scale is None else float(scale), tuple(post))
            return
        result = out
        if accumulate:
            if out.shape not in self.parts:
                self.parts[out.shape] = np.empty(out.shape, dtype=np.float32)
            result = self.parts[out.shape]
        np.matmul(a, b, out=result)
        if scale is not None:
            result *= scale
        for op, operand in post:
            if op == "exp":
                np.exp(result, out=result)
            else:
                NUMPY_OPS[op](result, operand, out=result)
        if accumulate:
            out += result

    def binary(self, out, op, a, b, post=(), sum_scale=None):
        """out = a op b, then each of `post` ((op, operand) as in batched, or ("sqrt", None),
        ("reciprocal", None)), then + sum_scale · what out held: one pass by oneDNN, only
        where this engine loaded it (`primitives`; callers keep a NumPy path for the rest)."""
        self.primitives.binary(out, op, a, b, tuple(post), sum_scale)

    def gelu(self, out, x, backward=False):
        """GELU (tanh form) by oneDNN, where this engine loaded it: out = gelu(x), or with
        backward out *= gelu'(x) -> whether it ran (else the caller uses NumPy's)."""
        if self.primitives is None:
            return False
        self.primitives.gelu(out, x, backward)
        return True

    def to_low(self, dst, src):
        """dst = src rounded to bf16 (stored as bf16, or as float32: dst's dtype)."""
        t0 = time.perf_counter()
        if dst.dtype != np.float32 and self.primitives is not None:
            self.primitives.convert(dst, src)  # ~5x ml_dtypes' cast, the same rounding
        elif dst.dtype != np.float32:
            np.copyto(dst, src, casting="unsafe")
        elif not src.flags.c_contiguous:  # a strided view: gathered, then rounded in place
            np.copyto(dst, src)
            self.round_in_blocks(dst, dst)
        else:
            self.round_in_blocks(dst, src)
        self.convert_seconds += time.perf_counter() - t0

    def round_in_blocks(self, dst, src):
        assert dst.flags.c_contiguous and src.flags.c_contiguous
        flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)
        for s in range(0, flat_src.size, BLOCK):
            n = min(BLOCK, flat_src.size - s)
            np.copyto(self.scratch[:n], flat_src[s:s + n], casting="unsafe")
            np.copyto(flat_dst[s:s + n], self.scratch[:n], casting="unsafe")
