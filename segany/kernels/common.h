/* Shared by segany's native kernels (each is its own shared library, see __init__.py).

   Their OpenMP loops hand out pieces dynamically (schedule(dynamic)): the cores a process gets
   are not equally fast. On the 2-vCPU development VM one vCPU ran a single-thread GEMM 1.27-1.47x
   slower than the other for minutes at a time (another tenant on its core), and with a static
   split the fast thread waited for the slow one at every loop's end: perf over the decoder's
   upscaling tail put 18% of both threads' samples in libgomp's barrier. Dynamic pieces (each
   tens of microseconds or more; a shared counter costs ~0.1 us) gave a vit_b click 0.92-1.00x
   and the global attention kernel 0.95x in in-process A/Bs, with identical results: each piece
   computes the same values whichever thread takes it. */
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
#if defined(__AVX__)
#include <immintrin.h>
#endif
typedef int32_t vi __attribute__((vector_size(VBYTES)));
#define LANES (VBYTES / 4)

static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* a > b ? a : b and a < b ? a : b per lane, b where either is NaN: x86's MAXPS/MINPS exactly.
   One instruction with AVX-512, where GCC makes a vselect of a comparison three (a compare into
   a mask register and two xors): GELU's clamps this way made it 25% faster. With AVX2 GCC made
   a compare and a blend whose operand it kept on the stack. */
static inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return vselect(a > b, a, b);
#endif
}

static inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    return (vf)_mm256_min_ps((__m256)a, (__m256)b);
#else
    return vselect(a < b, a, b);
#endif
}

static inline vf vload(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

/* the first n (< LANES: the rest zero / untouched) or all LANES floats. Masked moves with AVX2
   and AVX-512: a memcpy of a variable size is a library call, and the fixed-size one into a
   zeroed vector went through the stack (in the decoder tail's first-conv loop, AVX2 on an AMD
   EPYC, a store-forwarding stall on every load: ~8% of the tail). */
#if defined(__AVX2__) && !defined(__AVX512F__)
static inline __m256i part_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

static inline vf load_part(const float *p, int64_t n) {
    if (n >= LANES) return vload(p);
#if defined(__AVX512F__)
    return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << (n > 0 ? n : 0)) - 1), p);
#elif defined(__AVX2__)
    return (vf)_mm256_maskload_ps(p, part_mask(n));
#else
    vf x = {0};
    if (n > 0) __builtin_memcpy(&x, p, sizeof(float) * (size_t)(n & (LANES - 1))); /* (n < LANES here) */
    return x;
#endif
}

static inline void store_part(float *p, vf x, int64_t n) {
    if (n >= LANES) {
        vstore(p, x);
        return;
    }
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << (n > 0 ? n : 0)) - 1), (__m512)x);
#elif defined(__AVX2__)
    _mm256_maskstore_ps(p, part_mask(n), (__m256)x);
#else
    if (n > 0) __builtin_memcpy(p, &x, sizeof(float) * (size_t)(n & (LANES - 1)));
#endif
}

/* exp(x) for x <= 0 (softmax arguments): 2^k * exp(f), |f| <= ln2/2, a degree-6 polynomial
   (Cephes' expf: relative error ~1e-7); below -87 the result is 0. */
static inline vf vexp(vf x) {
    vi under = x < -87.0f;
    x = vmax((vf){0} - 87.0f, x);
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

/* keep v in a register: with AVX2's 16 registers GCC folds a vector's load into every
   multiply-add that reads it (a block of 4 x 2 accumulators then loads each vector 4 times: 12
   loads per 8 FMAs). A kernel whose inner loop measured faster for it asks for it. */
#if VBYTES == 32 && (defined(__GNUC__) || defined(__clang__))
#define PIN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define PIN_REGISTER(v) ((void)0)
#endif

/* Small GEMMs in registers (the attention kernels, the decoder tail's first convolution):
   GEMM_QB rows x up to GEMM_VB vectors of accumulators. AVX2 has 16 vector registers, not 32:
   there 4 x 4 accumulators spilled two of them every step and read B from memory for each
   multiply-add (20 loads per 16 FMAs); 4 x 3 keeps B's vectors in registers (AVX2 emulated on
   the AVX-512 VM, 2026-12-06: the encoder's global attention kernel 0.84x, the decoder tail
   0.93-0.96x). */
#ifndef GEMM_B_IN_REGISTERS
#define GEMM_B_IN_REGISTERS 0 /* (see block_gemm; a kernel file may define it 1 before this header) */
#endif
#define GEMM_QB 4
#define GEMM_VB (VBYTES == 64 ? 4 : 3)

/* C[m][j] (GEMM_QB rows of stride c_rs, nv <= GEMM_VB vectors) = (accumulate ? C * row_scale[m] : 0)
   + sum_k A[m*a_rs + k] B[k*b_rs + j] for k < K: GEMM_QB x nv accumulators in registers across k. */
static inline __attribute__((always_inline)) void block_gemm(int nv, int64_t K, const float *restrict A, int64_t a_rs,
                                                             const float *restrict B, int64_t b_rs, float *restrict C,
                                                             int64_t c_rs, const float *restrict row_scale) {
    vf acc[GEMM_QB][GEMM_VB];
    for (int m = 0; m < GEMM_QB; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = row_scale ? vload(C + m * c_rs + j * LANES) * row_scale[m] : (vf){0};
    for (int64_t k = 0; k < K; k++) {
        vf b[GEMM_VB];
        for (int j = 0; j < nv; j++) {
            vf bj = vload(B + k * b_rs + j * LANES);
            /* (B's vector loaded once, not GEMM_QB times: AMD EPYC (AVX2), 2026-12-06, the decoder
               tail 0.935x with it, the encoder's attention kernels 1.06x, so they leave it off) */
            if (GEMM_B_IN_REGISTERS) PIN_REGISTER(bj);
            b[j] = bj;
        }
        for (int m = 0; m < GEMM_QB; m++) {
            float a = A[m * a_rs + k];
            for (int j = 0; j < nv; j++) acc[m][j] += a * b[j];
        }
    }
    for (int m = 0; m < GEMM_QB; m++)
        for (int j = 0; j < nv; j++) vstore(C + m * c_rs + j * LANES, acc[m][j]);
}

/* All n/LANES vectors of GEMM_QB rows, GEMM_VB at a time (constant widths: the accumulators stay in registers) */
static inline void rows_gemm(int64_t n, int64_t K, const float *A, int64_t a_rs, const float *B, int64_t b_rs, float *C,
                      int64_t c_rs, const float *row_scale) {
    int64_t nv = n / LANES, j = 0;
    for (; j + GEMM_VB <= nv; j += GEMM_VB) block_gemm(GEMM_VB, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale);
    switch (nv - j) {
    case 1: if (GEMM_VB > 1) block_gemm(1, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale); break;
    case 2: if (GEMM_VB > 2) block_gemm(2, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale); break;
    case 3: if (GEMM_VB > 3) block_gemm(3, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale); break;
    default: break;
    }
}

/* Denormal floats (below 1.2e-38) read as and written as zero in the calling thread, from
   ftz_begin() until ftz_end(its value): MXCSR's flush-to-zero and denormals-are-zero bits, x86
   only. On Intel cores every arithmetic operation on a denormal takes a microcode assist (a
   softmax's far tails times small values make them): with random vit_b weights on an
   unnormalised image a global block's attention took 341 ms without these bits, 286 with them.
   What is flushed weighs below float32's rounding of any sum it joins. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned int ftz_begin(void) {
    const unsigned int old = _mm_getcsr();
    _mm_setcsr(old | 0x8040u);
    return old;
}
static inline void ftz_end(unsigned int old) { _mm_setcsr(old); }
#else
static inline unsigned int ftz_begin(void) { return 0; }
static inline void ftz_end(unsigned int old) { (void)old; }
#endif

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
