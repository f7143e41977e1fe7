/* Shared by segany's native kernels (each is its own shared library, see __init__.py). */
#ifndef SEGANY_KERNELS_COMMON_H
#define SEGANY_KERNELS_COMMON_H
#include <stdint.h>
#include <stdlib.h>

/* GCC/Clang vector extensions, as wide as the target's registers: 16 lanes with AVX-512, 8 with
   AVX/AVX2, 4 otherwise (SSE2, NEON). Wider than the registers, GCC expands every vector
   operation piecewise: 16-lane vectors built for AVX2 made these kernels 12-43x slower. */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef int32_t vi __attribute__((vector_size(VBYTES)));
#define LANES (VBYTES / 4)

static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf vload(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

/* the first n (< LANES: the rest zero / untouched) or all LANES floats; masked moves with
   AVX-512 (a memcpy of a variable size is a library call) */
static inline vf load_part(const float *p, int64_t n) {
    vf x = {0};
    if (n >= LANES)
        __builtin_memcpy(&x, p, sizeof x);
    else
#if defined(__AVX512F__)
        x = (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#else
        __builtin_memcpy(&x, p, sizeof(float) * (size_t)n);
#endif
    return x;
}

static inline void store_part(float *p, vf x, int64_t n) {
    if (n >= LANES)
        __builtin_memcpy(p, &x, sizeof x);
    else
#if defined(__AVX512F__)
        _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)x);
#else
        __builtin_memcpy(p, &x, sizeof(float) * (size_t)n);
#endif
}

/* exp(x) for x <= 0 (softmax arguments): 2^k * exp(f), |f| <= ln2/2, a degree-6 polynomial
   (Cephes' expf: relative error ~1e-7); below -87 the result is 0. */
static inline vf vexp(vf x) {
    vi under = x < -87.0f;
    x = vselect(x < -87.0f, (vf){0} - 87.0f, x);
    vf kf = x * 1.44269504088896341f;
    vf k = (kf + 12582912.0f) - 12582912.0f; /* round to nearest (|kf| < 2^22) */
    vi ki = __builtin_convertvector(k, vi);
    vf f = x - k * 0.693359375f;
    f = f + k * 2.12194440e-4f;
    vf f2 = f * f;
    vf y = f * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * f + 8.3334519073e-3f;
    y = y * f + 4.1665795894e-2f;
    y = y * f + 1.6666665459e-1f;
    y = y * f + 5.0000001201e-1f;
    y = y * f2 + f + 1.0f;
    vi bits = (ki + 127) << 23;
    vf scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return (vf)((vi)(y * scale) & ~under);
}

/* Per-thread scratch memory, kept between calls: a fresh multi-MB malloc is a fresh mapping
   whose pages fault in on every call. */
static __thread float *scratch_buf = 0;
static __thread size_t scratch_cap = 0;

static float *scratch(size_t n_floats) {
    if (n_floats > scratch_cap) {
        free(scratch_buf);
        scratch_buf = (float *)malloc(sizeof(float) * n_floats);
        scratch_cap = scratch_buf ? n_floats : 0;
    }
    return scratch_buf;
}

/* This build's vector width in floats (segany.kernels.decoder_preferred). */
int segany_vector_lanes(void) { return LANES; }

/* Whether this build runs its entry points on OpenMP threads. Built with -fopenmp it links
   libgomp.so.1, which in a PyTorch process is PyTorch's own copy (same soname, loaded first): the
   pieces then run on PyTorch's intra-op threads, not on threads competing with them. */
int segany_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
#endif
