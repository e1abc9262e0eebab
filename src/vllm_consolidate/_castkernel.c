/* The float32 -> bfloat16 cast as one pass over memory (used by vllm_consolidate/casts.py when built).
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
 * AVX2 casted 1.5x faster than SSE2 on the 2-core test machine, bench/cast_rate.py). */
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

static PyObject *float32_to_bfloat16(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*:float32_to_bfloat16", &src, &dst)) return NULL;
    if (src.len % 4 != 0 || dst.len * 2 != src.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "float32_to_bfloat16: need 4*n source bytes and 2*n output bytes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    float32_to_bfloat16_bits((const unsigned char *)src.buf, (unsigned char *)dst.buf, src.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"float32_to_bfloat16", float32_to_bfloat16, METH_VARARGS,
     "float32_to_bfloat16(src, out): the float32 elements of src (bytes) as bfloat16 bits in out, rounded to "
     "nearest even as torch rounds; releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_castkernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__castkernel(void) { return PyModule_Create(&module); }
