"""oneDNN through ctypes: its row-major GEMMs (dnnl_sgemm, dnnl_gemm_bf16bf16f32) and
primitives (batched matmuls with fused element-wise post-ops, reorders, GELU, and
element-wise binary ops with post-ops), each made once per layout of its operands
and kept.  trainer/gemm.py chooses and drives them; this module is only the binding."""
import collections
import ctypes

import numpy as np

from trainer.errors import EngineError

# dnnl_cpu_isa_t bit masks (oneDNN 3.x): a CPU has an ISA when all its bits are set
ISA_AVX512_CORE, ISA_AVX512_BF16, ISA_AMX = 0x27, 0xE7, 0xFE7
ISA_NAMES = {0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0xF: "avx2_vnni", 0x1F: "avx2_vnni_2",
             0x27: "avx512_core", 0x67: "avx512_core_vnni", 0xE7: "avx512_core_bf16",
             0x1EF: "avx512_core_fp16", 0xFE7: "avx512_core_amx", 0xFEF: "avx512_core_amx",
             0x1FE7: "avx512_core_amx_fp16", 0x1FEF: "avx512_core_amx_fp16"}
# oneDNN C API constants (dnnl_types.h, 3.x)
DNNL_CPU, DNNL_STREAM_IN_ORDER = 1, 1
DNNL_DATA_TYPE = {"float32": 3, "bfloat16": 2}
ALG_LINEAR, ALG_GELU_TANH, ARG_SRC, ARG_WEIGHTS, ARG_DST = 0x26, 0x2B, 1, 33, 17
ARG_SRC_1, ARG_DIFF_SRC, ARG_DIFF_DST, FORWARD_TRAINING = 2, 129, 145, 64
# binary ops and post-ops (dst = dst op operand, the operand broadcast along its size-1
# axes) and the execution argument of the operand of post-op number i
BINARY = {"add": 0x1FFF0, "mul": 0x1FFF1, "div": 0x1FFF4, "sub": 0x1FFF5}
# element-wise post-ops without an operand: (algorithm, alpha, beta); 1/x is pow(x, -1)
ELTWISE = {"exp": (0x2A, 0.0, 0.0), "sqrt": (0x25, 0.0, 0.0), "reciprocal": (0x30, 1.0, -1.0)}


def post_op_operand(i):
    return 32768 * (i + 1) | 2  # DNNL_ARG_ATTR_MULTIPLE_POST_OP(i) | DNNL_ARG_SRC_1


class OneDNN:
    """libdnnl's row-major GEMMs through ctypes."""

    def __init__(self, path):
        try:
            self.lib = lib = ctypes.CDLL(path)
        except OSError as e:
            hint = (" (oneDNN's OpenMP runtime: apt-get install libgomp1, or your OS's libgomp)"
                    if "gomp" in str(e) else "")
            raise EngineError(f"cannot load oneDNN from {path}: {e}{hint}") from None
        args = [ctypes.c_char, ctypes.c_char, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
        for fn in (lib.dnnl_sgemm, lib.dnnl_gemm_bf16bf16f32):
            fn.argtypes, fn.restype = args, ctypes.c_int

        class Version(ctypes.Structure):
            _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]
        lib.dnnl_version.restype = ctypes.POINTER(Version)
        lib.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
        v = lib.dnnl_version().contents
        self.version = f"{v.major}.{v.minor}.{v.patch}"
        self.isa = lib.dnnl_get_effective_cpu_isa()  # after ONEDNN_MAX_CPU_ISA caps it

    def has(self, isa):
        return self.isa & isa == isa

    @property
    def isa_name(self):
        return ISA_NAMES.get(self.isa, hex(self.isa))

    def batched(self):
        """The matmul-primitive runner of this process (made on first use)."""
        if getattr(self, "primitives", None) is None:
            self.primitives = Primitives(self.lib)
        return self.primitives

    def gemm(self, fn, out, a, b, beta=0.0):
        (ta, lda), (tb, ldb), ldc = operands(out, a, b)
        (M, K), N = a.shape, b.shape[1]
        status = fn(ta, tb, M, N, K, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, beta,
                    out.ctypes.data, ldc)
        if status != 0:
            raise EngineError(f"oneDNN GEMM failed with status {status} "
                              f"({'unimplemented on this CPU' if status == 3 else 'error'})")


class ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class Primitives:
    """oneDNN matmul primitives over stacks of matrices, out[...] = scale · a[...] @ b[...]
    (or += with accumulate: a sum post-op), one per layout of (out, a, b), made on first
    use and kept: a layout's shapes and strides stay the same from block to block, only
    the data pointers move."""

    # binary primitives kept at once: their sum scale is baked in, and AdamW's (1 − lr·λ)
    # changes with the LR schedule, so the least recently used are destroyed
    BINARY_KEPT = 16

    def __init__(self, lib):
        self.lib, self.made, self.made_binary = lib, {}, collections.OrderedDict()
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        check(lib.dnnl_engine_create(ctypes.byref(self.engine), DNNL_CPU, ctypes.c_size_t(0)), "engine")
        check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, ctypes.c_uint(DNNL_STREAM_IN_ORDER)),
              "stream")
        lib.dnnl_memory_set_data_handle.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.dnnl_primitive_execute.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]

    def descriptor(self, x):
        md, dims = ctypes.c_void_p(), ctypes.c_int64 * 12
        check(self.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), x.ndim, dims(*x.shape), DNNL_DATA_TYPE[x.dtype.name],
            dims(*strides_of(x))), "memory descriptor")
        return md

    def attributes(self, scale, post, sum_scale):
        """The post-op chain, in this order: × scale, each of `post` ((op, operand) of
        BINARY, or (op, None) of ELTWISE), then + sum_scale × what dst held ->
        (attr, post_ops, [(execution argument, descriptor) of each operand])."""
        lib, attr, post_ops = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
        check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)), "post-ops")
        chain, operands = 0, []
        if scale is not None:
            check(lib.dnnl_post_ops_append_eltwise(post_ops, ALG_LINEAR, ctypes.c_float(scale),
                                                   ctypes.c_float(0.0)), "scale")
            chain += 1
        for op, operand in post:
            if op in ELTWISE:
                alg, alpha, beta = ELTWISE[op]
                check(lib.dnnl_post_ops_append_eltwise(post_ops, alg, ctypes.c_float(alpha),
                                                       ctypes.c_float(beta)), op)
            else:
                md = self.descriptor(operand)
                check(lib.dnnl_post_ops_append_binary(post_ops, BINARY[op], md), op)
                operands.append((post_op_operand(chain), md))
            chain += 1
        if sum_scale is not None:
            check(lib.dnnl_post_ops_append_sum(post_ops, ctypes.c_float(sum_scale), ctypes.c_int32(0), 0), "sum")
        check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops), "post-ops")
        return attr, post_ops, operands

    def make(self, out, a, b, accumulate, scale, post):
        lib = self.lib
        attr, post_ops, operands = self.attributes(scale, post, 1.0 if accumulate else None)
        descriptors = [self.descriptor(x) for x in (a, b, out)]
        desc, primitive = ctypes.c_void_p(), ctypes.c_void_p()
        src, weights, dst = descriptors
        check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(desc), self.engine, src, weights, None, dst, attr),
              "matmul")
        check(lib.dnnl_primitive_create(ctypes.byref(primitive), desc), "matmul primitive")
        ids = (ARG_SRC, ARG_WEIGHTS, ARG_DST) + tuple(arg for arg, _ in operands)
        args = self.arguments(ids, descriptors + [md for _, md in operands])
        return primitive, args, (attr, post_ops, desc, descriptors, operands)  # the last kept alive with it

    def make_binary(self, out, op, a, b, post, sum_scale):
        """An element-wise binary primitive: out = a op b, then the post-op chain."""
        lib = self.lib
        attr, post_ops, operands = self.attributes(None, post, sum_scale)
        descriptors = [self.descriptor(x) for x in (a, b, out)]
        desc, primitive = ctypes.c_void_p(), ctypes.c_void_p()
        check(lib.dnnl_binary_primitive_desc_create(ctypes.byref(desc), self.engine, BINARY[op], *descriptors, attr),
              "binary")
        check(lib.dnnl_primitive_create(ctypes.byref(primitive), desc), "binary primitive")
        ids = (ARG_SRC, ARG_SRC_1, ARG_DST) + tuple(arg for arg, _ in operands)
        args = self.arguments(ids, descriptors + [md for _, md in operands])
        return primitive, args, (attr, post_ops, desc, descriptors, operands)

    def make_reorder(self, dst, src):
        """A reorder primitive: dst = src converted (bf16 rounds to nearest even)."""
        lib, desc, primitive = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        descriptors = [self.descriptor(x) for x in (src, dst)]
        check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(desc), descriptors[0], self.engine,
                                                     descriptors[1], self.engine, None), "reorder")
        check(lib.dnnl_primitive_create(ctypes.byref(primitive), desc), "reorder primitive")
        return primitive, self.arguments((ARG_SRC, ARG_DST), descriptors), (desc, descriptors)

    def arguments(self, ids, descriptors):
        """The execution arguments: one memory object per operand, its data pointer
        set at each call."""
        args = (ExecArg * len(ids))()
        for i, (arg, md) in enumerate(zip(ids, descriptors)):
            memory = ctypes.c_void_p()
            check(self.lib.dnnl_memory_create(ctypes.byref(memory), md, self.engine, None), "memory")
            args[i].arg, args[i].memory = arg, memory.value
        args.memories = [a.memory for a in args]  # read once: ctypes field access costs µs
        return args

    def make_gelu(self, out, x, backward):
        """GELU's tanh form, forward (out = gelu(x)) or backward (out = dout · gelu'(x), in
        place): oneDNN's eltwise primitive, one vectorised pass where NumPy makes ten."""
        lib, forward, primitive = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        descriptors = [self.descriptor(a) for a in (x, out)]
        check(lib.dnnl_eltwise_forward_primitive_desc_create(
            ctypes.byref(forward), self.engine, FORWARD_TRAINING, ALG_GELU_TANH, descriptors[0], descriptors[1],
            ctypes.c_float(0.0), ctypes.c_float(0.0), None), "gelu")
        if not backward:
            check(lib.dnnl_primitive_create(ctypes.byref(primitive), forward), "gelu primitive")
            return primitive, self.arguments((ARG_SRC, ARG_DST), descriptors), (forward, descriptors)
        desc = ctypes.c_void_p()
        check(lib.dnnl_eltwise_backward_primitive_desc_create(
            ctypes.byref(desc), self.engine, ALG_GELU_TANH, descriptors[1], descriptors[1], descriptors[0],
            ctypes.c_float(0.0), ctypes.c_float(0.0), forward, None), "gelu backward")
        check(lib.dnnl_primitive_create(ctypes.byref(primitive), desc), "gelu backward primitive")
        ids = (ARG_SRC, ARG_DIFF_DST, ARG_DIFF_SRC)
        return primitive, self.arguments(ids, [descriptors[0], descriptors[1], descriptors[1]]), \
            (forward, desc, descriptors)

    def gelu(self, out, x, backward=False):
        key = ("gelu", backward) + tuple((a.shape, a.strides, a.dtype) for a in (out, x))
        if key not in self.made:
            self.made[key] = self.make_gelu(out, x, backward)
        self.execute(self.made[key], (x, out, out) if backward else (x, out))

    def convert(self, dst, src):
        key = ("reorder",) + tuple((x.shape, x.strides, x.dtype) for x in (dst, src))
        if key not in self.made:
            self.made[key] = self.make_reorder(dst, src)
        self.execute(self.made[key], (src, dst))

    def binary(self, out, op, a, b, post=(), sum_scale=None):
        """out = a op b (each broadcast along its size-1 axes), then each of `post` (see
        attributes), then + sum_scale × what out held."""
        operands = [x for _, x in post if x is not None]
        key = tuple((x.shape, x.strides, x.dtype) for x in [out, a, b] + operands) + (
            op, tuple(name for name, _ in post), sum_scale)
        made = self.made_binary.pop(key, None) or self.make_binary(out, op, a, b, post, sum_scale)
        self.made_binary[key] = made  # now the most recently used
        if len(self.made_binary) > self.BINARY_KEPT:
            self.destroy(self.made_binary.popitem(last=False)[1])
        self.execute(made, [a, b, out] + operands)

    def destroy(self, made):
        primitive, args, (attr, post_ops, desc, descriptors, operands) = made
        lib = self.lib
        lib.dnnl_primitive_destroy(primitive)
        for memory in args.memories:
            lib.dnnl_memory_destroy(ctypes.c_void_p(memory))
        lib.dnnl_primitive_desc_destroy(desc)
        for md in descriptors + [md for _, md in operands]:
            lib.dnnl_memory_desc_destroy(md)
        lib.dnnl_post_ops_destroy(post_ops)
        lib.dnnl_primitive_attr_destroy(attr)

    def execute(self, made, arrays):
        # the hot path of every attention block (keys hold dtypes, not their names: µs)
        primitive, args, _ = made
        set_handle = self.lib.dnnl_memory_set_data_handle
        for memory, x in zip(args.memories, arrays):
            set_handle(memory, x.ctypes.data)
        check(self.lib.dnnl_primitive_execute(primitive, self.stream, len(arrays), args), "primitive")
        check(self.lib.dnnl_stream_wait(self.stream), "stream")

    def run(self, out, a, b, accumulate=False, scale=None, post=()):
        operands = [x for _, x in post if x is not None]
        key = tuple((x.shape, x.strides, x.dtype) for x in [out, a, b] + operands) + (
            accumulate, scale, tuple(op for op, _ in post))
        if key not in self.made:
            self.made[key] = self.make(out, a, b, accumulate, scale, post)
        self.execute(self.made[key], [a, b, out] + operands)


def one_batch_axis(arrays):
    """Stacks (B,NH,M,N), B > 1, as (1,B·NH,M,N) views, or None where one cannot be so
    (oneDNN's brgemm takes an operand (1,1,M,N) shared by the matrices of (1,NH,…), and
    runs its reference kernels, 500x slower, for (B,NH,…) with B > 1 or in 3-D)."""
    stack = arrays[0].shape[:2]  # out's
    if any(x.ndim != 4 for x in arrays) or stack[0] == 1:
        return None
    flat = []
    for x in arrays:
        if x.shape[:2] == (1, 1):
            flat.append(x)
            continue
        if x.shape[:2] != stack:  # broadcast along one of the two axes only
            return None
        try:
            flat.append(x.reshape((1, -1) + x.shape[2:], copy=False))
        except ValueError:  # its two leading axes do not merge without a copy
            return None
    return flat


def strides_of(x):
    """x's strides in elements, a size-1 axis given the stride a dense array has there:
    NumPy leaves such strides arbitrary (0 after np.newaxis), and oneDNN then reads the
    layout as a permuted one (a mask of shape (1,1,64,64) as "cdab", not "abcd")."""
    strides, dense = [], 1
    for size, stride in reversed(list(zip(x.shape, x.strides))):
        strides.append(dense if size == 1 else stride // x.itemsize)
        dense = max(dense, abs(strides[-1]) * size)
    return strides[::-1]


def check(status, what):
    if status != 0:
        raise EngineError(f"oneDNN {what} failed with status {status}")


def operands(out, a, b):
    """-> ((transa, lda), (transb, ldb), ldc) of out = a @ b in row-major BLAS terms."""
    tc, ldc = layout_of(out)
    assert tc == b"N" and out.dtype == np.float32, "GEMM output must be row-major float32"
    return layout_of(a), layout_of(b), ldc


def layout_of(x):
    """A 2-D view -> (b'N' or b'T', leading dimension) in row-major BLAS terms."""
    rows, cols = x.shape
    s0, s1 = (s // x.itemsize for s in x.strides)
    if s1 == 1 or cols == 1:
        return b"N", max(s0, cols, 1)
    if s0 == 1 or rows == 1:
        return b"T", max(s1, rows, 1)
    raise ValueError(f"GEMM operand of strides {x.strides} is neither row- nor column-major")
