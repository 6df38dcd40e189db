// The vectorised inner loops of the CPU block-sparse kernels, written once and compiled
// once per instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp). Each of those
// translation units sets SK_ISA (a namespace name), SK_VW (floats per vector register),
// SK_MR (rows per register tile), SK_MO (output rows per weight-gradient tile), SK_REGISTERS
// (vector registers) and a
// `#pragma GCC target`, then includes this file. Nothing here may include a header or call
// a function defined outside it: code compiled for AVX-512 must never be linked into a
// caller that runs on a CPU without it. The callers see only isa.h: plain structs and one
// `dsd` and one `sdd` function per instruction set, picked at run time (kernels.cpp).
//
// Vectors are GCC vector extensions; the compiler keeps each MR x NV tile of accumulators
// in registers and emits broadcast fused multiply-adds.
#include "isa.h"

namespace sparse_kernels {
namespace cpu {
namespace SK_ISA {
// Internal to this translation unit: only dsd and sdd are seen by the linker.
namespace {

typedef float vec __attribute__((vector_size(SK_VW * 4)));
typedef float uvec __attribute__((vector_size(SK_VW * 4), aligned(4), may_alias));

// out[0:MR, 0:NV*VW] = init + sum over pairs p, kk < k of a[r, p.a_offset + kk] * p.w[kk, n0 + :]
// `init` is the bias (or zero). Rows >= rows_valid are computed but not stored.
template <int MR, int NV>
__attribute__((always_inline)) inline void dsd_tile(const float* a, int64_t lda, const DsdPair* pairs, int64_t npairs,
                                                    int64_t k, int64_t ldw, int64_t n0, const float* bias, float* out,
                                                    int64_t ldo, int64_t rows_valid) {
  vec acc[MR][NV];
#pragma GCC unroll 32
  for (int v = 0; v < NV; ++v) {
    vec init = bias ? *reinterpret_cast<const uvec*>(bias + n0 + v * SK_VW) : vec{};
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) acc[r][v] = init;
  }
  for (int64_t p = 0; p < npairs; ++p) {
    const float* ap = a + pairs[p].a_offset;
    const float* w = pairs[p].w + n0;
    for (int64_t kk = 0; kk < k; ++kk) {
      vec b[NV];
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const uvec*>(w + kk * ldw + v * SK_VW);
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const float s = ap[r * lda + kk];
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) acc[r][v] += s * b[v];
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
    if (r >= rows_valid) break;
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) *reinterpret_cast<uvec*>(out + r * ldo + n0 + v * SK_VW) = acc[r][v];
  }
}

template <int NV>
void dsd_rows(const DsdRows& t) {
  constexpr int64_t NR = NV * SK_VW;
  // One vector per row (n = 16 on AVX-512) leaves registers for twice the rows.
  constexpr int MR2 = (NV == 1 && 2 * SK_MR + 2 <= SK_REGISTERS) ? 2 * SK_MR : SK_MR;
  int64_t m = 0;
  if (MR2 != SK_MR)
    for (; m + MR2 <= t.rows; m += MR2)
      for (int64_t n0 = 0; n0 < t.n; n0 += NR)
        dsd_tile<MR2, NV>(t.a + m * t.lda, t.lda, t.pairs, t.npairs, t.k, t.n, n0, t.bias, t.out + m * t.ldo, t.ldo,
                          MR2);
  for (; m < t.rows; m += SK_MR) {
    // The caller guarantees rows up to a multiple of SK_MR are readable (zero padding).
    const int64_t valid = t.rows - m < SK_MR ? t.rows - m : SK_MR;
    for (int64_t n0 = 0; n0 < t.n; n0 += NR)
      dsd_tile<SK_MR, NV>(t.a + m * t.lda, t.lda, t.pairs, t.npairs, t.k, t.n, n0, t.bias, t.out + m * t.ldo, t.ldo,
                          valid);
  }
}

// acc[o0:o0+MO, j0:j0+NV*VW] += sum over m < rows of dy[m, o0 + o] * a[m, j0 + :]
template <int MO, int NV>
__attribute__((always_inline)) inline void sdd_tile(const float* dy, int64_t lddy, const float* a, int64_t lda,
                                                    int64_t rows, float* acc, int64_t ldacc) {
  vec c[MO][NV];
#pragma GCC unroll 32
  for (int o = 0; o < MO; ++o)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) c[o][v] = *reinterpret_cast<const uvec*>(acc + o * ldacc + v * SK_VW);
  for (int64_t m = 0; m < rows; ++m) {
    vec x[NV];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) x[v] = *reinterpret_cast<const uvec*>(a + m * lda + v * SK_VW);
#pragma GCC unroll 32
    for (int o = 0; o < MO; ++o) {
      const float s = dy[m * lddy + o];
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) c[o][v] += s * x[v];
    }
  }
#pragma GCC unroll 32
  for (int o = 0; o < MO; ++o)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) *reinterpret_cast<uvec*>(acc + o * ldacc + v * SK_VW) = c[o][v];
}

template <int NV>
void sdd_block(const SddBlock& t) {
  constexpr int64_t NR = NV * SK_VW;
  // One vector per row (bi = 16 on AVX-512) leaves registers for twice the output rows.
  constexpr int MO = (NV == 1 && 2 * SK_MO + 2 <= SK_REGISTERS) ? 2 * SK_MO : SK_MO;
  int64_t o0 = 0;
  for (; o0 + MO <= t.bo; o0 += MO)
    for (int64_t j0 = 0; j0 < t.bi; j0 += NR)
      sdd_tile<MO, NV>(t.dy + o0, t.lddy, t.a + j0, t.lda, t.rows, t.acc + o0 * t.bi + j0, t.bi);
  for (; o0 < t.bo; o0 += SK_MO)
    for (int64_t j0 = 0; j0 < t.bi; j0 += NR)
      sdd_tile<SK_MO, NV>(t.dy + o0, t.lddy, t.a + j0, t.lda, t.rows, t.acc + o0 * t.bi + j0, t.bi);
}

}  // namespace

// One block of output columns for `rows` rows: see DsdRows.
void dsd(const DsdRows& t) {
  if (t.n % (2 * SK_VW) == 0)
    dsd_rows<2>(t);
  else
    dsd_rows<1>(t);
}

// One weight-gradient block: see SddBlock.
void sdd(const SddBlock& t) {
  if (t.bi % (2 * SK_VW) == 0)
    sdd_block<2>(t);
  else
    sdd_block<1>(t);
}

}  // namespace SK_ISA
}  // namespace cpu
}  // namespace sparse_kernels
