// What the CPU block-sparse linear and conv2d kernels share: the instruction-set choice,
// argument checks, the tables of live blocks, and the two parallel drivers.
//
// Both kernels are the same two products over "rows" (pixels of a convolution, rows of a
// linear input):
//   dsd: out[m, block b] = sum over the live (block, tap) pairs of b of a[m, pair] @ w[pair]
//        (forward with the row-sorted index, grad-input with the column-sorted one);
//   sdd: dW[slot, tap] = dy[:, row block].T @ a[:, tap, column block], for live slots only.
// A linear layer reads its rows in place. A convolution's dsd gathers, tile by tile, the
// rows of an implicit im2col matrix [pixel][tap][channel] into a small per-thread buffer:
// stride, padding and dilation (and their transposes for grad-input) live in that gather
// alone. Its sdd reads runs of input pixels in place (conv.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <cstring>
#include <vector>

#include "isa.h"

namespace sparse_kernels {
namespace cpu {

// The best instruction set this CPU runs; SPARSE_KERNELS_CPU_ISA=generic|avx2|avx512
// forces one (an error if the CPU lacks it). Read at every call.
const Isa& select_isa();

void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim);
// The bias as a contiguous float32 [features] tensor, or an undefined tensor when absent.
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const char* op, int64_t features);
// Block sides must be multiples of 16 (whole vectors in every ISA).
void check_block(const char* op, int64_t bo, int64_t bi);

// The live (block, tap) pairs of each output block b < ptr.numel() - 1, in the order of
// ptr/slots: a_offset = tap * tap_stride + other[slot] * k, w = packed + (slot * taps + tap) * k * n.
// Checks that the index is well formed (int32, monotone pointers, indices in range).
struct PairTable {
  std::vector<DsdPair> pairs;
  std::vector<int64_t> ptr;
};
// `values` is the op's values tensor: the slots must be its blocks.
PairTable make_pairs(const char* op, const at::Tensor& ptr, const at::Tensor& slots, const at::Tensor& other,
                     int64_t other_blocks, int64_t taps, int64_t tap_stride, int64_t k, int64_t n,
                     const at::Tensor& values, const float* packed);

// Checks (row_idx, col_idx, order) of a grad-weight call: order is a permutation of the slots.
void check_slots(const char* op, const at::Tensor& row_idx, const at::Tensor& col_idx, const at::Tensor& order,
                 int64_t rows, int64_t cols);

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// A linear layer's rows, read in place (copied only for the last, partial tile).
struct DirectRows {
  const float* a;
  int64_t lda, total;
  // Rows [m0, m0 + rows), readable up to a multiple of `pad` rows.
  const float* tile(int64_t m0, int64_t rows, int64_t pad, std::vector<float>& scratch) const {
    if (m0 + round_up(rows, pad) <= total) return a + m0 * lda;
    scratch.assign(round_up(rows, pad) * lda, 0.f);
    if (rows * lda > 0) std::memcpy(scratch.data(), a + m0 * lda, sizeof(float) * rows * lda);
    return scratch.data();
  }
};

// Rows of the implicit im2col matrix of a convolution, [pixel][tap][channel], over the
// destination pixels (the output for forward and grad-weight, the input for grad-input).
struct GatherRows {
  const float* src;  // NHWC [batch, src_h, src_w, channels]
  int64_t channels, src_h, src_w, dst_h, dst_w, kh, kw;
  int64_t stride[2], padding[2], dilation[2];
  bool transposed;  // grad-input: dst pixel y takes the source pixel (y + p - i * d) / s
  int64_t lda() const { return kh * kw * channels; }

  // The source coordinate of destination coordinate `y` at tap `i` on axis `d`, or -1.
  int64_t source(int64_t y, int64_t i, int d, int64_t size) const {
    if (!transposed) {
      const int64_t s = y * stride[d] - padding[d] + i * dilation[d];
      return s >= 0 && s < size ? s : -1;
    }
    const int64_t t = y + padding[d] - i * dilation[d];
    if (t < 0 || t % stride[d]) return -1;
    return t / stride[d] < size ? t / stride[d] : -1;
  }

  void row(int64_t pixel, float* out) const {
    const int64_t n = pixel / (dst_h * dst_w), y = pixel / dst_w % dst_h, x = pixel % dst_w;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t sy = source(y, i, 0, src_h);
      for (int64_t j = 0; j < kw; ++j, out += channels) {
        const int64_t sx = sy < 0 ? -1 : source(x, j, 1, src_w);
        if (sx < 0)
          std::memset(out, 0, sizeof(float) * channels);
        else
          std::memcpy(out, src + ((n * src_h + sy) * src_w + sx) * channels, sizeof(float) * channels);
      }
    }
  }

  const float* tile(int64_t m0, int64_t rows, int64_t pad, std::vector<float>& scratch) const {
    scratch.resize(round_up(rows, pad) * lda());
    std::fill(scratch.begin() + rows * lda(), scratch.end(), 0.f);
    for (int64_t m = 0; m < rows; ++m) row(m0 + m, scratch.data() + m * lda());
    return scratch.data();
  }
};

// Rows per parallel tile: a multiple of the ISA's register tile, a gathered tile of at most
// ~256 KB (it is reread once per output block), and enough tiles to feed every thread.
inline int64_t tile_rows(const Isa& isa, int64_t total, int64_t lda) {
  const int64_t mr = isa.rows_per_tile;
  int64_t rows = std::clamp<int64_t>(65536 / std::max<int64_t>(lda, 1) / mr * mr, mr, 8 * mr);
  const int64_t threads = at::get_num_threads();
  while (rows > mr && (total + rows - 1) / rows < 4 * threads) rows -= mr;
  return rows;
}

// out[m, b * n : (b + 1) * n] = bias + sum over pairs of output block b, for m < total.
template <class Rows>
void run_dsd(const Isa& isa, const Rows& source, int64_t total, int64_t lda, const PairTable& table, int64_t k,
             int64_t n, const float* bias, float* out) {
  const int64_t blocks = static_cast<int64_t>(table.ptr.size()) - 1, ldo = blocks * n;
  const int64_t rows = tile_rows(isa, total, lda);
  at::parallel_for(0, (total + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = t * rows, valid = std::min(rows, total - m0);
      const float* a = source.tile(m0, valid, isa.rows_per_tile, scratch);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t p = table.ptr[b];
        isa.dsd({a, lda, valid, table.pairs.data() + p, table.ptr[b + 1] - p, k, n, bias ? bias + b * n : nullptr,
                 out + m0 * ldo + b * n, ldo});
      }
    }
  });
}

// acc[slot] (contiguous [nnz][bo][bi]) = dy[:, row block].T @ a[:, column block] over
// `total` rows, in chunks of rows that stay in cache; the threads share a chunk's slots in
// `order` (column-sorted: neighbours read the same input columns). Each slot is summed by
// one thread in row order, so the result does not depend on the thread count.
inline void run_sdd(const Isa& isa, const float* a, int64_t lda, int64_t total, const float* dy, int64_t lddy,
                    const int32_t* row_idx, const int32_t* col_idx, const int32_t* order, int64_t nnz, int64_t bo,
                    int64_t bi, float* acc) {
  if (nnz > 0) std::memset(acc, 0, sizeof(float) * nnz * bo * bi);
  const int64_t chunk = 128;
  for (int64_t m0 = 0; m0 < total && nnz > 0; m0 += chunk) {
    const int64_t rows = std::min(chunk, total - m0);
    at::parallel_for(0, nnz, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t slot = order[i];
        isa.sdd({dy + m0 * lddy + row_idx[slot] * bo, lddy, a + m0 * lda + col_idx[slot] * bi, lda, rows, bo, bi,
                 acc + slot * bo * bi});
      }
    });
  }
}

}  // namespace cpu
}  // namespace sparse_kernels
