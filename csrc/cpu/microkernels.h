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

// Vectors of W floats (W = SK_VW, or SK_VW / 2 for blocks of 8 outputs under AVX-512).
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(W * 4)));
  typedef float unaligned __attribute__((vector_size(W * 4), aligned(4), may_alias));
};
typedef Lanes<SK_VW>::type vec;

template <int W = SK_VW>
inline typename Lanes<W>::type load(const float* p) {
  return *reinterpret_cast<const typename Lanes<W>::unaligned*>(p);
}
template <class V>
inline void store(float* p, V v) {
  constexpr int W = sizeof(V) / 4;
  *reinterpret_cast<typename Lanes<W>::unaligned*>(p) = v;
}

// --------------------------------------------------------------------------- dsd
// Rows r0 .. r0 + MR of a panel times outputs n0 .. n0 + NV * W: every panel value is
// broadcast once and feeds NV fused multiply-adds; every weight vector feeds MR. ONE: the
// pairs of vector blocks (k = 1, one lane of a column each).
template <int MR, int NV, int W, bool ONE>
__attribute__((always_inline)) inline void dsd_tile(const DsdTile& t, int64_t r0, int64_t n0) {
  typedef typename Lanes<W>::type V;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const V init = t.bias ? load<W>(t.bias + n0 + v * W) : V{};
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) acc[r][v] = init;
  }
  const int64_t chunks = t.k / kPanelWidth, n = t.n;
  if constexpr (ONE) {
    if (t.triples) {  // panel row q feeds row q of the first tap, q - 1 of the second, q - 2 of the third
      for (int64_t p = 0; p + 3 <= t.npairs; p += 3) {
        const float* a = t.groups[t.pairs[p].group] + t.pairs[p].offset + r0 * kPanelWidth;
        V b[3][NV];
#pragma GCC unroll 3
        for (int u = 0; u < 3; ++u)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) b[u][v] = load<W>(t.pairs[p + u].w + n0 + v * W);
#pragma GCC unroll 40
        for (int q = 0; q < MR + 2; ++q) {
          const float s = a[q * kPanelWidth];
#pragma GCC unroll 3
          for (int u = 0; u < 3; ++u)
            if (q - u >= 0 && q - u < MR)
#pragma GCC unroll 8
              for (int v = 0; v < NV; ++v) acc[q - u][v] += s * b[u][v];
        }
      }
      goto done;
    }
  }
  for (int64_t p = 0; p < t.npairs; ++p) {
    const float* a = t.groups[t.pairs[p].group] + t.pairs[p].offset + r0 * kPanelWidth;
    const float* w = t.pairs[p].w + n0;
    if constexpr (ONE) {
      V b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b[v] = load<W>(w + v * W);
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const float s = a[r * kPanelWidth];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += s * b[v];
      }
      continue;
    }
    for (int64_t c = 0; c < chunks; ++c, a += t.column_stride) {
#pragma GCC unroll 16
      for (int kk = 0; kk < kPanelWidth; ++kk, w += n) {
        V b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) b[v] = load<W>(w + v * W);
#pragma GCC unroll 32
        for (int r = 0; r < MR; ++r) {
          const float s = a[r * kPanelWidth + kk];
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[r][v] += s * b[v];
        }
      }
    }
  }
done:
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(t.out + (r0 + r) * t.ldo + n0 + v * W, acc[r][v]);
}

// A register tile exactly `rows` (<= MR) high: one instantiation per height, so short tiles
// (a 7- or 14-pixel image row) waste no work.
template <int MR, int NV, int W, bool ONE>
void dsd_rows(const DsdTile& t, int64_t r0, int64_t n0, int64_t rows) {
  if constexpr (MR > 1) {
    if (rows < MR) return dsd_rows<MR - 1, NV, W, ONE>(t, r0, n0, rows);
  }
  dsd_tile<MR, NV, W, ONE>(t, r0, n0);
}

// NV output vectors of W floats per register tile, up to SK_ACC / NV rows.
template <int NV, int W, bool ONE>
void dsd_columns(const DsdTile& t) {
  constexpr int MR = SK_ACC / NV;
  for (int64_t n0 = 0; n0 < t.n; n0 += NV * W)
    for (int64_t r0 = 0; r0 < t.rows; r0 += MR)
      dsd_rows<MR, NV, W, ONE>(t, r0, n0, t.rows - r0 < MR ? t.rows - r0 : MR);
}

template <bool ONE>
void dsd_any(const DsdTile& t) {
  const int64_t vectors = t.n / SK_VW;
  if (t.n % SK_VW != 0) {  // blocks of 8 outputs under AVX-512: half vectors
    if constexpr (SK_VW % 2 == 0) dsd_columns<1, SK_VW / 2, ONE>(t);
  } else if (vectors % 4 == 0 && SK_ACC % 4 == 0) {
    dsd_columns<4, SK_VW, ONE>(t);
  } else if (vectors % 3 == 0 && SK_ACC % 3 == 0) {
    dsd_columns<3, SK_VW, ONE>(t);
  } else if (vectors % 2 == 0) {
    dsd_columns<2, SK_VW, ONE>(t);
  } else {
    dsd_columns<1, SK_VW, ONE>(t);
  }
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
  if (t.k == 1)
    dsd_any<true>(t);
  else
    dsd_any<false>(t);
}

// Copies rows into one group of a panel: see PanelSource.
void pack(const PanelSource& t) {
  const int64_t column = t.column_rows * kPanelWidth;
  for (int64_t r = 0; r < t.rows; ++r) {
    const float* pixel = t.pixels[r];
    float* out = t.panel + r * kPanelWidth;
    for (int64_t j = 0; j < t.nused; ++j, out += column) {
      const int64_t first = t.used[j] * kPanelWidth;
      if (!pixel || first + kPanelWidth <= t.channels) {
#pragma GCC unroll 4
        for (int v = 0; v < kPanelWidth / SK_VW; ++v)
          store(out + v * SK_VW, pixel ? load(pixel + first + v * SK_VW) : vec{});
      } else {  // the last chunk of channels that 16 does not divide
        for (int64_t c = 0; c < kPanelWidth; ++c) out[c] = first + c < t.channels ? pixel[first + c] : 0.f;
      }
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
