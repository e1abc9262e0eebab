/* The float32 -> bfloat16 and float32 -> float16 casts as one pass over memory (used by vllm_consolidate/casts.py
 * when built).
 *
 * Why C: a bf16 conversion is bound by the CPU on a small machine, and the cast was half of it. numpy needs six
 * passes over each chunk for the same arithmetic (shift, mask, two adds, the narrowing shift, the NaN test), and
 * importing numpy costs 0.1 s of every bf16 run. This loop reads each element once, writes each result once and
 * releases the GIL, so the writer's threads cast on every core. It is optional: without a C compiler the package
 * installs without it and casts.py does the same arithmetic with numpy (tests check both against torch).
 *
 * The arithmetic is casts.py's, bit for bit: round to nearest even on the float32 bits,
 * (u + 0x7FFF + ((u >> 16) & 1)) >> 16, which is what torch computes; a NaN keeps its sign and the top of its
 * payload and is quieted (bit 6 of the bfloat16 set), since rounding could carry a NaN's payload into the sign or
 * turn it into an infinity.
 *
 * float16 (the output for GPUs without bfloat16) is IEEE round to nearest even, subnormals included, overflow to
 * infinity, which is what torch computes; numpy's cast ran at 220 M elements per second here, a quarter of the bf16
 * passes. Where the CPU has F16C (x86-64 since 2012) the conversion instruction does it, eight at a time; elsewhere a
 * scalar version of the same rounding on the bits. A NaN stays NaN (quieted, sign and top payload bits kept, as
 * F16C does); torch leaves its payload undefined.
 *
 * Inputs are plain byte buffers (memoryviews of the writer's chunks), so elements are loaded with memcpy: no
 * alignment is assumed, and the compiler turns the copies into plain vector loads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
/* safetensors bytes are little-endian; elsewhere the extension is not built and casts.py uses numpy. */
#error "vllm_consolidate._castkernel: little-endian hosts only"
#endif

/* GCC builds an AVX2 copy next to the baseline one and picks it at load time (the loop vectorizes either way;
 * AVX2 cast 1.5x faster than SSE2 on the 2-core test machine: 2.8 against 1.8 G elements/s, 4 MiB chunks). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
static void float32_to_bfloat16_bits(const unsigned char *restrict src, unsigned char *restrict dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + 4 * i, 4);
        uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* no overflow: the top non-NaN is 0xFF800000 */
        uint32_t quiet_nan = (u >> 16) | 0x0040u;
        uint16_t v = (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? quiet_nan : rounded);
        memcpy(dst + 2 * i, &v, 2);
    }
}

/* One float32 (bits u) to float16 bits, rounded to nearest even. */
static inline uint16_t float32_to_float16_one(uint32_t u) {
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu)); /* NaN, quieted */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* 65520 and above (a tie with 65536) round to inf */
    if (a >= 0x38800000u) { /* a normal float16: rebias the exponent by 127 - 15, round away 13 mantissa bits */
        uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13)); /* a carry may step to the next binade */
    }
    if (a <= 0x33000000u) return (uint16_t)sign; /* 2**-25 and below: zero (2**-25 itself is a tie with zero) */
    /* A float16 subnormal, in units of 2**-24: the 24-bit significand shifted right by 14..24 bits, rounded. */
    uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - (a >> 23);
    uint32_t q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    q += (rest > half) | ((rest == half) & q & 1u); /* a carry into 0x400 is the smallest normal: still right */
    return (uint16_t)(sign | q);
}

static void float32_to_float16_scalar(const unsigned char *src, unsigned char *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + 4 * i, 4);
        uint16_t v = float32_to_float16_one(u);
        memcpy(dst + 2 * i, &v, 2);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_F16C_PATH 1
__attribute__((target("avx,f16c")))
static void float32_to_float16_f16c(const unsigned char *src, unsigned char *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps((const float *)(src + 4 * i));
        _mm_storeu_si128((__m128i *)(dst + 2 * i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    float32_to_float16_scalar(src + 4 * i, dst + 2 * i, n - i);
}
#endif

static void float32_to_float16_bits(const unsigned char *src, unsigned char *dst, Py_ssize_t n) {
#ifdef HAVE_F16C_PATH
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
        float32_to_float16_f16c(src, dst, n);
        return;
    }
#endif
    float32_to_float16_scalar(src, dst, n);
}

typedef void (*kernel_fn)(const unsigned char *, unsigned char *, Py_ssize_t);

/* Parse (src, out), check that out holds exactly n 16-bit results for src's n float32, run fn without the GIL. */
static PyObject *run_narrowing(PyObject *args, const char *format, kernel_fn fn) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, format, &src, &dst)) return NULL;
    if (src.len % 4 != 0 || dst.len * 2 != src.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "need 4*n source bytes and 2*n output bytes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fn((const unsigned char *)src.buf, (unsigned char *)dst.buf, src.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *float32_to_bfloat16(PyObject *self, PyObject *args) {
    (void)self;
    return run_narrowing(args, "y*w*:float32_to_bfloat16", float32_to_bfloat16_bits);
}

static PyObject *float32_to_float16(PyObject *self, PyObject *args) {
    (void)self;
    return run_narrowing(args, "y*w*:float32_to_float16", float32_to_float16_bits);
}

/* Whether float32_to_float16 uses the F16C instruction (else the scalar rounding): for tests and benchmarks. */
static PyObject *float16_hardware(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#ifdef HAVE_F16C_PATH
    return PyBool_FromLong(__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx"));
#else
    Py_RETURN_FALSE;
#endif
}

/* The scalar float16 rounding on any CPU, so tests check it where F16C would take over. */
static PyObject *float32_to_float16_portable(PyObject *self, PyObject *args) {
    (void)self;
    return run_narrowing(args, "y*w*:float32_to_float16_portable", float32_to_float16_scalar);
}

static PyMethodDef methods[] = {
    {"float32_to_bfloat16", float32_to_bfloat16, METH_VARARGS,
     "float32_to_bfloat16(src, out): the float32 elements of src (bytes) as bfloat16 bits in out, rounded to "
     "nearest even as torch rounds; releases the GIL."},
    {"float32_to_float16", float32_to_float16, METH_VARARGS,
     "float32_to_float16(src, out): the float32 elements of src as float16 bits in out, rounded to nearest even "
     "(F16C where the CPU has it); releases the GIL."},
    {"float32_to_float16_portable", float32_to_float16_portable, METH_VARARGS,
     "float32_to_float16 without F16C, whatever the CPU (for tests)."},
    {"float16_hardware", float16_hardware, METH_NOARGS, "Whether float32_to_float16 uses the F16C instruction."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_castkernel", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__castkernel(void) { return PyModule_Create(&module); }
