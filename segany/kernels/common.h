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
typedef int32_t vi __attribute__((vector_size(VBYTES)));
#define LANES (VBYTES / 4)

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
