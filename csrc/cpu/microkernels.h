// The vectorised inner loops of the CPU block-sparse kernels, written once and compiled
// once per instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp). Each of those
// translation units sets SK_ISA (a namespace name), SK_VW (floats per vector register),
// SK_ACC (vector registers given to accumulators) and a `#pragma GCC target`, then includes
// this file. Nothing here may include a header or call a function defined outside it: code
// compiled for AVX-512 must never be linked into a caller that runs on a CPU without it. The
// callers see only isa.h: plain structs and one `dsd` and one `sdd` per instruction set,
// picked at run time (driver.cpp).
//
// Vectors are GCC vector extensions; the compiler keeps each register tile of accumulators
// in registers and emits broadcast fused multiply-adds. Every operand is addressed at a
// compile-time offset from one pointer per loop (packed panels, packed weights, runs), so
// the loops spend no instructions on address arithmetic.
#include "isa.h"

namespace sparse_kernels {
namespace cpu {
namespace SK_ISA {
// Internal to this translation unit: only dsd and sdd are seen by the linker.
namespace {

typedef float vec __attribute__((vector_size(SK_VW * 4)));
typedef float uvec __attribute__((vector_size(SK_VW * 4), aligned(4), may_alias));

inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }

// --------------------------------------------------------------------------- dsd
// Rows r0 .. r0 + MR of a panel times outputs n0 .. n0 + NV * VW: every panel value is
// broadcast once and feeds NV fused multiply-adds; every weight vector feeds MR.
template <int MR, int NV>
__attribute__((always_inline)) inline void dsd_tile(const DsdTile& t, int64_t r0, int64_t n0) {
  vec acc[MR][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const vec init = t.bias ? load(t.bias + n0 + v * SK_VW) : vec{};
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) acc[r][v] = init;
  }
  const int64_t chunks = t.k / kPanelWidth, n = t.n;
  for (int64_t p = 0; p < t.npairs; ++p) {
    const float* a = t.groups[t.pairs[p].group] + t.pairs[p].offset + r0 * kPanelWidth;
    const float* w = t.pairs[p].w + n0;
    for (int64_t c = 0; c < chunks; ++c, a += t.column_stride) {
#pragma GCC unroll 16
      for (int kk = 0; kk < kPanelWidth; ++kk, w += n) {
        vec b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) b[v] = load(w + v * SK_VW);
#pragma GCC unroll 32
        for (int r = 0; r < MR; ++r) {
          const float s = a[r * kPanelWidth + kk];
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[r][v] += s * b[v];
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(t.out + (r0 + r) * t.ldo + n0 + v * SK_VW, acc[r][v]);
}

// A register tile exactly `rows` (<= MR) high: one instantiation per height, so short tiles
// (a 7- or 14-pixel image row) waste no work.
template <int MR, int NV>
void dsd_rows(const DsdTile& t, int64_t r0, int64_t n0, int64_t rows) {
  if constexpr (MR > 1) {
    if (rows < MR) return dsd_rows<MR - 1, NV>(t, r0, n0, rows);
  }
  dsd_tile<MR, NV>(t, r0, n0);
}

// NV output vectors per register tile, up to SK_ACC / NV rows.
template <int NV>
void dsd_columns(const DsdTile& t) {
  constexpr int MR = SK_ACC / NV;
  for (int64_t n0 = 0; n0 < t.n; n0 += NV * SK_VW)
    for (int64_t r0 = 0; r0 < t.rows; r0 += MR) dsd_rows<MR, NV>(t, r0, n0, t.rows - r0 < MR ? t.rows - r0 : MR);
}

// --------------------------------------------------------------------------- sdd
// acc[o0 : o0 + MO, j0 : j0 + NV * VW] += the runs' rows of dy[:, o0 + o] (broadcast) times
// a[:, j0 + :]; the tile stays in registers across all the runs.
template <int MO, int NV>
__attribute__((always_inline)) inline void sdd_tile(const SddBlock& t, int64_t o0, int64_t j0) {
  float* acc = t.acc + o0 * t.bi + j0;
  vec c[MO][NV];
#pragma GCC unroll 32
  for (int o = 0; o < MO; ++o)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[o][v] = load(acc + o * t.bi + v * SK_VW);
  for (int64_t run = 0; run < t.nruns; ++run) {
    const float* dy = t.dy + t.runs[run].dy + o0;
    const float* a = t.a + t.runs[run].a + j0;
    for (int64_t m = 0; m < t.runs[run].rows; ++m, dy += t.dy_step, a += t.a_step) {
      vec x[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) x[v] = load(a + v * SK_VW);
#pragma GCC unroll 32
      for (int o = 0; o < MO; ++o) {
        const float s = dy[o];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[o][v] += s * x[v];
      }
    }
  }
#pragma GCC unroll 32
  for (int o = 0; o < MO; ++o)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(acc + o * t.bi + v * SK_VW, c[o][v]);
}

// MO output rows per register tile: 16 (which divides every block side) where the
// accumulators fit, else 8, else 4.
template <int NV>
void sdd_columns(const SddBlock& t) {
  constexpr int MO = 16 * NV <= SK_ACC ? 16 : 8 * NV <= SK_ACC ? 8 : 4;
  for (int64_t o0 = 0; o0 < t.bo; o0 += MO)
    for (int64_t j0 = 0; j0 < t.bi; j0 += NV * SK_VW) sdd_tile<MO, NV>(t, o0, j0);
}

}  // namespace

// One panel times one output block: see DsdTile.
void dsd(const DsdTile& t) {
  const int64_t vectors = t.n / SK_VW;
  if (vectors % 4 == 0 && SK_ACC % 4 == 0)
    dsd_columns<4>(t);
  else if (vectors % 3 == 0 && SK_ACC % 3 == 0)
    dsd_columns<3>(t);
  else if (vectors % 2 == 0)
    dsd_columns<2>(t);
  else
    dsd_columns<1>(t);
}

// Copies rows into one group of a panel: see PanelSource.
void pack(const PanelSource& t) {
  const int64_t chunks = t.k / kPanelWidth, column = t.column_rows * kPanelWidth;
  for (int64_t r = 0; r < t.rows; ++r) {
    const float* pixel = t.pixels[r];
    float* out = t.panel + r * kPanelWidth;
    for (int64_t j = 0; j < t.nused; ++j) {
      const float* block = pixel ? pixel + t.used[j] * t.k : nullptr;
      for (int64_t c = 0; c < chunks; ++c, out += column)
#pragma GCC unroll 4
        for (int v = 0; v < kPanelWidth / SK_VW; ++v)
          store(out + v * SK_VW, block ? load(block + c * kPanelWidth + v * SK_VW) : vec{});
    }
  }
}

// One weight-gradient block: see SddBlock.
void sdd(const SddBlock& t) {
  if (t.bi % (2 * SK_VW) == 0)
    sdd_columns<2>(t);
  else
    sdd_columns<1>(t);
}

}  // namespace SK_ISA
}  // namespace cpu
}  // namespace sparse_kernels
