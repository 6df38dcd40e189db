// The inner loops of vector blocks (bo output channels x 1 input channel) that the square
// kernels' loops (microkernels.h) do not cover: the channel-major grad-input, the grad-weight and transposes.
// Included after microkernels.h by each instruction set's translation unit, under the same rules
// (nothing included, nothing called outside it).
#include "isa.h"

namespace sparse_kernels {
namespace cpu {
namespace SK_ISA {
namespace {

// ------------------------------------------------------------------------ block tiles
// Channels j0 .. j0 + J of a chunk over positions q0 .. q0 + NQ * SK_VW of the tile: each
// vector of a plane is loaded once and feeds J fused multiply-adds (one per channel's broadcast
// weight), so that NQ + J loads serve NQ * J of them; the sums over the block's taps and bo
// planes stay in registers.
template <int J, int NQ>
__attribute__((always_inline)) inline void block_vectors(const BlockTile& t, int64_t j0, int64_t q0) {
  vec acc[J][NQ];
  float* out[J];
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
    out[j] = t.out + t.channels[j0 + j] * kTileWidth + q0;
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) acc[j][q] = load(out[j] + q * SK_VW);
  }
  for (int64_t tap = 0; tap < t.ntaps; ++tap) {
    const float* a = t.src + t.offsets[tap] + q0;
    const float* w = t.w + tap * t.bo * t.count + j0;
    for (int64_t o = 0; o < t.bo; ++o, a += t.plane, w += t.count) {
      vec v[NQ];
#pragma GCC unroll 8
      for (int q = 0; q < NQ; ++q) v[q] = load(a + q * SK_VW);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const float weight = w[j];
#pragma GCC unroll 8
        for (int q = 0; q < NQ; ++q) acc[j][q] += weight * v[q];
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) store(out[j] + q * SK_VW, acc[j][q]);
}

// Channels in register tiles of up to SK_ACC / NQ (at most kChunkChannels) at positions q0 .. q0 + NQ * SK_VW.
template <int NQ>
void block_columns(const BlockTile& t, int64_t q0) {
  constexpr int JMAX = SK_ACC / NQ < kChunkChannels ? SK_ACC / NQ : kChunkChannels;
  for (int64_t j0 = 0; j0 < t.count; j0 += JMAX) {
    switch (t.count - j0 < JMAX ? t.count - j0 : JMAX) {
      case 1: block_vectors<1, NQ>(t, j0, q0); break;
      case 2: block_vectors<2, NQ>(t, j0, q0); break;
      case 3: block_vectors<3, NQ>(t, j0, q0); break;
      case 4: if constexpr (JMAX >= 4) block_vectors<4, NQ>(t, j0, q0); break;
      case 5: if constexpr (JMAX >= 5) block_vectors<5, NQ>(t, j0, q0); break;
      default: if constexpr (JMAX >= 6) block_vectors<6, NQ>(t, j0, q0); break;
    }
  }
}

// ------------------------------------------------------------------------ vector sdd
// Items j0 .. j0 + J of a tile, outputs o0 .. o0 + NV * W: every row's dy vectors feed J fused
// multiply-adds each, one per item's broadcast input; the accumulators stay in registers across
// all the runs.
template <int J, int NV, int W>
__attribute__((always_inline)) inline void sdd_vector_tile(const SddVectorTile& t, int64_t j0, int64_t o0) {
  typedef typename Lanes<W>::type V;
  V c[J][NV];
  int64_t offset[J];
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
    offset[j] = t.offsets[j0 + j];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[j][v] = load<W>(t.acc[j0 + j] + o0 + v * W);
  }
  for (int64_t run = 0; run < t.nruns; ++run) {
    const float* dy = t.dy + t.runs[run].dy + o0;
    const float* a = t.a + t.runs[run].a;
    for (int64_t m = 0; m < t.runs[run].rows; ++m, dy += t.dy_step, a += t.a_step) {
      V y[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) y[v] = load<W>(dy + v * W);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const float s = a[offset[j]];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[j][v] += s * y[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(t.acc[j0 + j] + o0 + v * W, c[j][v]);
}

// Up to JMAX items at a time (the broadcasts' offsets live in general registers: at most 8).
template <int NV, int W>
void sdd_vector_items(const SddVectorTile& t, int64_t o0) {
  constexpr int JMAX = SK_ACC / NV < 8 ? SK_ACC / NV : 8;
  for (int64_t j0 = 0; j0 < t.items; j0 += JMAX) {
    const int64_t j = t.items - j0 < JMAX ? t.items - j0 : JMAX;
    switch (j) {
      case 1: sdd_vector_tile<1, NV, W>(t, j0, o0); break;
      case 2: if constexpr (JMAX >= 2) sdd_vector_tile<2, NV, W>(t, j0, o0); break;
      case 3: if constexpr (JMAX >= 3) sdd_vector_tile<3, NV, W>(t, j0, o0); break;
      case 4: if constexpr (JMAX >= 4) sdd_vector_tile<4, NV, W>(t, j0, o0); break;
      case 5: if constexpr (JMAX >= 5) sdd_vector_tile<5, NV, W>(t, j0, o0); break;
      case 6: if constexpr (JMAX >= 6) sdd_vector_tile<6, NV, W>(t, j0, o0); break;
      case 7: if constexpr (JMAX >= 7) sdd_vector_tile<7, NV, W>(t, j0, o0); break;
      default: if constexpr (JMAX >= 8) sdd_vector_tile<8, NV, W>(t, j0, o0); break;
    }
  }
}

// ------------------------------------------------------------------------ transposes
// r[i][j] -> r[j][i] for a W x W block in registers: at each scale s, rows i and i + s swap their
// off-diagonal s-wide halves (log2(W) stages of two-source shuffles).
typedef int lane_index __attribute__((vector_size(SK_VW * 4)));

// The shuffles' lane indices (constants once inlined): row i takes its own lanes where bit S of
// the lane is clear, row i + S's lanes shifted down where it is set; row i + S the rest.
template <int S>
__attribute__((always_inline)) inline lane_index halves(bool high) {
  lane_index m{};
#pragma GCC unroll 16
  for (int l = 0; l < SK_VW; ++l) m[l] = (l & S) == 0 ? l + (high ? S : 0) : SK_VW + l - (high ? 0 : S);
  return m;
}

template <int S>
__attribute__((always_inline)) inline void transpose_stage(vec* r) {
  if constexpr (S >= 1) {
    const lane_index low = halves<S>(false), high = halves<S>(true);
#pragma GCC unroll 16
    for (int i = 0; i < SK_VW; ++i)
      if ((i & S) == 0) {
        const vec a = r[i], b = r[i + S];
        r[i] = __builtin_shuffle(a, b, low);
        r[i + S] = __builtin_shuffle(a, b, high);
      }
    transpose_stage<S / 2>(r);
  }
}

// The first n (< SK_VW) floats at p, the other lanes zero; and their store (masked: nothing
// past them is read or written).
__attribute__((always_inline)) inline vec load_first(const float* p, int n) {
#if SK_VW == 16
  return __builtin_ia32_loadups512_mask(p, vec{}, static_cast<unsigned short>((1u << n) - 1));
#elif SK_VW == 8
  typedef int mask8 __attribute__((vector_size(32)));
  const mask8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return __builtin_ia32_maskloadps256(reinterpret_cast<const vec*>(p), lane < n);
#else
  vec v{};
  for (int l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}

__attribute__((always_inline)) inline void store_first(float* p, vec v, int n) {
#if SK_VW == 16
  __builtin_ia32_storeups512_mask(p, v, static_cast<unsigned short>((1u << n) - 1));
#elif SK_VW == 8
  typedef int mask8 __attribute__((vector_size(32)));
  const mask8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  __builtin_ia32_maskstoreps256(reinterpret_cast<vec*>(p), lane < n, v);
#else
  for (int l = 0; l < n; ++l) p[l] = v[l];
#endif
}

}  // namespace

// A matrix transposed, SK_VW x SK_VW blocks at a time in registers (the blocks at the edges
// partial: masked loads and stores): see Transpose.
void transpose(const Transpose& t) {
  const int64_t outer = t.rows_inner ? t.cols : t.rows, inner = t.rows_inner ? t.rows : t.cols;
  for (int64_t u = 0; u < outer; u += SK_VW)
    for (int64_t v = 0; v < inner; v += SK_VW) {
      const int64_t i0 = t.rows_inner ? v : u, j0 = t.rows_inner ? u : v;
      const int ni = t.rows - i0 < SK_VW ? static_cast<int>(t.rows - i0) : SK_VW;
      const int nj = t.cols - j0 < SK_VW ? static_cast<int>(t.cols - j0) : SK_VW;
      vec r[SK_VW];
      const float* src = t.src + i0 * t.src_stride + j0;
#pragma GCC unroll 16
      for (int i = 0; i < SK_VW; ++i)
        r[i] = i >= ni ? vec{} : nj == SK_VW ? load(src + i * t.src_stride) : load_first(src + i * t.src_stride, nj);
      transpose_stage<SK_VW / 2>(r);
      float* dst = t.dst + j0 * t.dst_stride + i0;
      if (ni == SK_VW) {
#pragma GCC unroll 16
        for (int j = 0; j < SK_VW; ++j)
          if (j < nj) store(dst + j * t.dst_stride, r[j]);
      } else {
#pragma GCC unroll 16
        for (int j = 0; j < SK_VW; ++j)
          if (j < nj) store_first(dst + j * t.dst_stride, r[j], ni);
      }
    }
}

// One output block's share of a tile: see BlockTile. Register tiles of 4 vectors of positions
// by up to SK_ACC / 4 channels (6 under AVX-512: 24 accumulators, 10 loads per 24 multiply-adds).
void block_tile(const BlockTile& t) {
  constexpr int NQ = 4;
  const int64_t vectors = t.width / SK_VW;
  int64_t q = 0;
  for (; q + NQ <= vectors; q += NQ) block_columns<NQ>(t, q * SK_VW);
  switch (vectors - q) {
    case 1: block_columns<1>(t, q * SK_VW); break;
    case 2: block_columns<2>(t, q * SK_VW); break;
    case 3: block_columns<3>(t, q * SK_VW); break;
    default: break;
  }
}

// Items of one output block of vector blocks: see SddVectorTile.
void sdd_vector(const SddVectorTile& t) {
  if (t.bo % SK_VW != 0) {  // blocks of 8 outputs under AVX-512: half vectors
    if constexpr (SK_VW % 2 == 0)
      for (int64_t o0 = 0; o0 < t.bo; o0 += SK_VW / 2) sdd_vector_items<1, SK_VW / 2>(t, o0);
    return;
  }
  const int64_t vectors = t.bo / SK_VW;
  if (vectors % 2 == 0 && SK_ACC >= 12) {
    for (int64_t o0 = 0; o0 < t.bo; o0 += 2 * SK_VW) sdd_vector_items<2, SK_VW>(t, o0);
  } else {
    for (int64_t o0 = 0; o0 < t.bo; o0 += SK_VW) sdd_vector_items<1, SK_VW>(t, o0);
  }
}

}  // namespace SK_ISA
}  // namespace cpu
}  // namespace sparse_kernels
