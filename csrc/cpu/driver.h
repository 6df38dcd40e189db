// What the CPU block-sparse linear and conv2d kernels share: the instruction-set choice, the
// tables of live blocks, packing, and the two parallel drivers.
//
// Both kernels are the same two products over "rows" (pixels of a convolution, rows of a
// linear input):
//   dsd: out[m, block b] = sum over the live (block, tap) pairs of b of a[m, pair] @ w[pair]
//        (forward with the row-sorted index, grad-input with the column-sorted one);
//   sdd: dW[slot, tap] = dy[:, row block].T @ a[:, tap, column block], for live slots only.
// The dsd packs the rows it needs, a tile at a time, into a panel (isa.h): a linear layer
// copies its rows, a convolution gathers the rows of its implicit im2col matrix (stride,
// padding and dilation, and their transposes for grad-input, live in that gather alone).
// The sdd reads runs of rows in place.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../ops.h"
#include "isa.h"

namespace sparse_kernels {
namespace cpu {

// The best instruction set this CPU runs; SPARSE_KERNELS_CPU_ISA=generic|avx2|avx512
// forces one (an error if the CPU lacks it). Read at every call.
const Isa& select_isa();

// kernels_take(dtype, bo, bi), whether the compiled kernels take a case, is declared in ops.h: it is
// also the op sparse_kernels::cpu_kernels_take, which Python asks (sparse_kernels.capability).
// values [nnz, bo, bi, *taps] -> the dense weight [rows * bo, cols * bi, *taps], zeros at dead blocks.
at::Tensor dense_weight(const at::Tensor& values, const LayoutShape& shape, const at::Tensor& row_idx,
                        const at::Tensor& col_idx);
// The inverse: the live blocks [nnz, bo, bi, *taps] of a dense [rows * bo, cols * bi, *taps].
at::Tensor live_blocks(const at::Tensor& dense, const LayoutShape& shape, const at::Tensor& row_idx,
                       const at::Tensor& col_idx);

// A buffer a thread keeps from call to call, grown as needed and never freed: the kernels'
// temporaries (packed weights, panels, runs, accumulators) then cost no malloc per call.
// (glibc serves large blocks as fresh mappings, whose pages fault in, zeroed, on every call.)
template <class T>
T* grow(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// values [nnz, bo, bi, *taps] (fp32) packed as [nnz][taps][k][n] into a thread's buffer: with
// (k, n) = (bi, bo) when `transpose` (the forward: inputs are the reduction), (bo, bi) else.
const float* pack_weights(const at::Tensor& values, bool transpose);

// fp16 and bf16 operands are widened to fp32 on the way in (the kernels compute in fp32).
inline at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One axis of a transposed convolution (a strided grad-input), phase by phase: destination (dx)
// coordinate y = r + s * Y of phase r < s reads source (dy) coordinate Y + a for each tap i with
// r + p - i * d = a * s. The source coordinates that some tap of some destination reads span
// [-before, extent - before). The square blocks' grad-input (conv2d.cpp) and the vector blocks'
// planes (vector_blocks.cpp) both walk it.
struct PhaseAxis {
  int64_t stride;
  std::vector<int64_t> count;                                  // per phase: destination coordinates
  std::vector<std::vector<std::pair<int64_t, int64_t>>> taps;  // per phase: (tap, a)
  int64_t before = 0, extent = 0;
};

// The axis of `dst` destination and `src` source coordinates, kernel size `kernel`, stride s,
// padding p, dilation d.
PhaseAxis phase_axis(int64_t dst, int64_t src, int64_t kernel, int64_t s, int64_t p, int64_t d);

// Where a dsd's panel puts each tap's inputs: the taps of one group share packed columns
// `rows` high, tap t reading them from panel row shift[t] on. Packing one tap per group (all
// shifts 0) works for any gather; a stride-1 convolution packs one group per kernel row, whose
// taps read the same packed window of an image row at shifted rows.
// A layout may cover a subset of the weight's taps (a phase of a strided grad-input): tap t
// then multiplies the weight's tap weight_tap[t] of weight_taps.
struct PanelLayout {
  int64_t rows, groups;
  std::vector<int64_t> group, shift;  // per tap
  bool triples = false;  // taps in threes of one group at shifts s, s + 1, s + 2 (isa.h: DsdTile)
  std::vector<int64_t> weight_tap;  // per tap; empty: tap t is the weight's tap t
  int64_t weight_taps = 0;          // the weight's taps; 0: as many as the layout's
  static PanelLayout per_tap(int64_t taps) {
    PanelLayout layout{kPanelRows, taps, std::vector<int64_t>(taps), std::vector<int64_t>(taps, 0)};
    for (int64_t t = 0; t < taps; ++t) layout.group[t] = t;
    return layout;
  }
};

// The live (block, tap) pairs of each output block b < ptr.size() - 1, in the order of the
// index, and the chunks of 16 input floats they read: used[j] fills the panel column j of every
// group. A pair reads its block's k inputs (k floats of a pixel: a square block's side, or the
// one channel of a vector block) from the column of its first chunk on, at its lane there.
// Pair weights sit at packed + (slot * weight taps + weight tap) * k * n (PanelLayout).
struct PairTable {
  std::vector<DsdPair> pairs;
  std::vector<int64_t> ptr;
  std::vector<int64_t> used;  // chunks of 16 input floats read by some pair, ascending
  PanelLayout layout;
  int64_t k = 0, channels = 0;  // channels: floats per source pixel
  // Floats of one group of the panel.
  int64_t group_floats() const { return static_cast<int64_t>(used.size()) * kPanelWidth * layout.rows; }
};

// Builds the table from an index (ptr [blocks + 1], slots [nnz], other [nnz]: the input block
// of each slot, k floats wide), checking that it is well formed (monotone pointers, indices in range).
PairTable make_pairs(const char* op, const at::Tensor& ptr, const at::Tensor& slots, const at::Tensor& other,
                     int64_t other_blocks, PanelLayout layout, int64_t k, int64_t n, const float* packed);

// A thread's packed panel: each group's address for the current tile, and the storage behind.
struct Panel {
  std::vector<float> storage;
  std::vector<const float*> groups;
  std::vector<const float*> pixels;  // scratch: the source pixel of each packed row
  std::vector<int64_t> keys;         // what each slot of storage holds (SegmentTiles)
};

// Packs `rows` panel rows of one group from the source pixels in panel.pixels into `dest`.
inline void pack_group(const Isa& isa, const PairTable& table, Panel& panel, int64_t rows, float* dest) {
  isa.pack({panel.pixels.data(), rows, table.layout.rows, table.used.data(), static_cast<int64_t>(table.used.size()),
            table.channels, dest});
}

// Checks (row_idx, col_idx, order) of a grad-weight call: order is a permutation of the slots.
void check_slots(const char* op, const at::Tensor& row_idx, const at::Tensor& col_idx, const at::Tensor& order,
                 int64_t rows, int64_t cols);

// Tiles of a dsd's destination rows: tile(t) is the run of destination rows m0 .. m0 + rows - 1
// it covers, and pack(isa, table, t, panel) makes panel.groups point at its packed operand.

// A linear layer's rows (row m is a + m * lda), kPanelRows at a time.
struct DirectTiles {
  const float* a;
  int64_t lda, total;
  PanelLayout layout() const { return PanelLayout::per_tap(1); }
  int64_t tiles() const { return ceil_div(total, kPanelRows); }
  std::pair<int64_t, int64_t> tile(int64_t t) const {
    return {t * kPanelRows, std::min(kPanelRows, total - t * kPanelRows)};
  }
  void pack(const Isa& isa, const PairTable& table, int64_t t, Panel& panel) const {
    const auto [m0, rows] = tile(t);
    panel.storage.resize(table.group_floats());
    panel.pixels.assign(kPanelRows, nullptr);
    for (int64_t r = 0; r < rows; ++r) panel.pixels[r] = a + (m0 + r) * lda;
    pack_group(isa, table, panel, kPanelRows, panel.storage.data());
    panel.groups.assign(1, panel.storage.data());
  }
};

// The implicit im2col matrix of a convolution over the destination pixels (the output for
// forward, the input for grad-input) of an NHWC source, for any stride, padding and dilation:
// kPanelRows pixels at a time, each tap packed on its own.
struct GatherTiles {
  const float* src;  // NHWC [batch, src_h, src_w, channels], pixels pixel_stride >= channels floats apart
  int64_t channels, pixel_stride, src_h, src_w, dst_h, dst_w, kh, kw, total;
  // The source row of destination row y at kernel row i, source_rows[y * kh + i], and the source
  // column of destination column x at kernel column j, source_cols[x * kw + j]; -1 outside.
  std::vector<int64_t> source_rows, source_cols;
  PanelLayout layout() const { return PanelLayout::per_tap(kh * kw); }
  int64_t tiles() const { return ceil_div(total, kPanelRows); }
  std::pair<int64_t, int64_t> tile(int64_t t) const {
    return {t * kPanelRows, std::min(kPanelRows, total - t * kPanelRows)};
  }
  void pack(const Isa& isa, const PairTable& table, int64_t t, Panel& panel) const {
    const auto [m0, rows] = tile(t);
    const int64_t taps = kh * kw, floats = table.group_floats();
    panel.storage.resize(taps * floats);
    panel.groups.resize(taps);
    panel.pixels.assign(taps * kPanelRows, nullptr);  // tap-major: pixels[tap * kPanelRows + r]
    int64_t x = m0 % dst_w, y = m0 / dst_w % dst_h, n = m0 / (dst_w * dst_h);
    for (int64_t r = 0; r < rows; ++r) {
      const float* image = src + n * src_h * src_w * pixel_stride;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t sy = source_rows[y * kh + i];
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t sx = source_cols[x * kw + j];
          if (sy >= 0 && sx >= 0)
            panel.pixels[(i * kw + j) * kPanelRows + r] = image + (sy * src_w + sx) * pixel_stride;
        }
      }
      if (++x == dst_w) {
        x = 0;
        if (++y == dst_h) y = 0, ++n;
      }
    }
    const std::vector<const float*> all = std::move(panel.pixels);
    for (int64_t tap = 0; tap < taps; ++tap) {
      panel.pixels.assign(all.begin() + tap * kPanelRows, all.begin() + (tap + 1) * kPanelRows);
      pack_group(isa, table, panel, kPanelRows, panel.storage.data() + tap * floats);
      panel.groups[tap] = panel.storage.data() + tap * floats;
    }
  }
};

// A convolution whose kernel columns step through the source one pixel apart (stride 1 along
// the width, forward or transposed). Tiles are segments of one destination row, taken segment
// by segment down the rows; each kernel row reads one packed window of a source row (halo
// included), at shifted rows for its taps, and a window packed for one destination row serves
// the next ones too (a ring of kh windows per thread). Each source row is packed about once.
struct SegmentTiles {
  const float* src;  // as GatherTiles
  int64_t channels, pixel_stride, src_h, src_w, dst_h, dst_w, kh, kw, batch;
  int64_t window_shift;  // source column of panel row 0 = destination column x0 + window_shift
  int64_t dilation;      // along the width
  bool transposed;
  std::vector<int64_t> source_rows;  // as GatherTiles
  int64_t segments() const { return ceil_div(dst_w, kPanelRows); }
  int64_t halo() const { return (kw - 1) * dilation; }
  PanelLayout layout() const {
    PanelLayout layout{ceil_div(dst_w, segments()) + halo(), kh, std::vector<int64_t>(kh * kw),
                       std::vector<int64_t>(kh * kw)};
    for (int64_t t = 0; t < kh * kw; ++t) {
      const int64_t j = t % kw;
      layout.group[t] = t / kw;
      layout.shift[t] = (transposed ? kw - 1 - j : j) * dilation;
    }
    layout.triples = kw == 3 && dilation == 1 && !transposed;
    return layout;
  }
  int64_t tiles() const { return batch * dst_h * segments(); }
  // Tile t: segment t / (batch * dst_h) of destination row t % (batch * dst_h).
  std::pair<int64_t, int64_t> tile(int64_t t) const {
    const int64_t segs = segments(), s = t / (batch * dst_h), row = t % (batch * dst_h);
    const int64_t x0 = s * dst_w / segs, x1 = (s + 1) * dst_w / segs;
    return {row * dst_w + x0, x1 - x0};
  }
  void pack(const Isa& isa, const PairTable& table, int64_t t, Panel& panel) const {
    const int64_t segs = segments(), s = t / (batch * dst_h), row = t % (batch * dst_h);
    const int64_t y = row % dst_h, n = row / dst_h, floats = table.group_floats();
    const int64_t x0 = s * dst_w / segs, width = (s + 1) * dst_w / segs - x0 + halo();
    if (panel.keys.empty()) {  // kh slots of windows, then one of zeros
      panel.storage.assign((kh + 1) * floats, 0.f);
      panel.keys.assign(kh, -1);
      panel.groups.resize(kh);
    }
    std::vector<int64_t> wanted(kh);
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t sy = source_rows[y * kh + i];
      wanted[i] = sy < 0 ? -1 : (n * src_h + sy) * segs + s;
    }
    for (int64_t i = 0; i < kh; ++i) {
      if (wanted[i] < 0) {
        panel.groups[i] = panel.storage.data() + kh * floats;  // a padding row: zeros
        continue;
      }
      int64_t slot = std::find(panel.keys.begin(), panel.keys.end(), wanted[i]) - panel.keys.begin();
      if (slot == kh) {  // not packed yet: take a slot this tile does not need
        slot = 0;
        while (panel.keys[slot] >= 0 && std::find(wanted.begin(), wanted.end(), panel.keys[slot]) != wanted.end())
          ++slot;
        const int64_t sy = source_rows[y * kh + i];
        const float* line = src + ((n * src_h + sy) * src_w) * pixel_stride;
        panel.pixels.resize(width);
        for (int64_t q = 0; q < width; ++q) {
          const int64_t sx = x0 + window_shift + q;
          panel.pixels[q] = sx >= 0 && sx < src_w ? line + sx * pixel_stride : nullptr;
        }
        pack_group(isa, table, panel, width, panel.storage.data() + slot * floats);
        panel.keys[slot] = wanted[i];
      }
      panel.groups[i] = panel.storage.data() + slot * floats;
    }
  }
};

// out[m, b * n : (b + 1) * n] = bias + sum over the pairs of output block b, for every tile's
// rows. Work items are (tile, group of output blocks): a few groups when the tiles alone would
// not keep every thread busy; a thread packs each tile once.
template <class Tiles>
void run_dsd(const Isa& isa, const Tiles& tiles, const PairTable& table, int64_t n, const float* bias, float* out) {
  const int64_t blocks = static_cast<int64_t>(table.ptr.size()) - 1, ldo = blocks * n, count = tiles.tiles();
  if (count == 0 || blocks == 0) return;
  const int64_t groups = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), count), 1, blocks);
  const int64_t per_group = ceil_div(blocks, groups), column_stride = table.layout.rows * kPanelWidth;
  at::parallel_for(0, count * groups, 1, [&](int64_t begin, int64_t end) {
    static thread_local Panel panel;
    panel.keys.clear();  // nothing packed yet in this call
    int64_t packed = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / groups, group = item % groups;
      const auto [m0, rows] = tiles.tile(t);
      if (t != packed) tiles.pack(isa, table, t, panel), packed = t;
      for (int64_t b = group * per_group; b < std::min(blocks, (group + 1) * per_group); ++b) {
        const int64_t p = table.ptr[b];
        isa.dsd({panel.groups.data(), column_stride, table.pairs.data() + p, table.ptr[b + 1] - p, table.k, n,
                 bias ? bias + b * n : nullptr, out + m0 * ldo + b * n, ldo, rows, table.k == 1 && table.layout.triples});
      }
    }
  });
}

// The runs of reduction rows an sdd reads, per (chunk of rows, tap): chunk c and tap t own
// runs[start[c * taps + t] .. start[c * taps + t + 1]).
struct SddPlan {
  std::vector<SddRun> runs;
  std::vector<int64_t> start{0};
  int64_t chunks = 0, taps = 1;
  // Empties the plan for `taps` taps, keeping its storage (plans live in a thread's buffer).
  void reset(int64_t plan_taps) {
    runs.clear();
    start.assign(1, 0);
    chunks = 0, taps = plan_taps;
  }
  // Appends a run to the current (chunk, tap), merged with the previous one where it continues it.
  void add(int64_t dy, int64_t a, int64_t rows, int64_t dy_step, int64_t a_step) {
    if (rows <= 0) return;
    if (static_cast<int64_t>(runs.size()) > start.back()) {
      SddRun& last = runs.back();
      if (last.dy + last.rows * dy_step == dy && last.a + last.rows * a_step == a) {
        last.rows += rows;
        return;
      }
    }
    runs.push_back({dy, a, rows});
  }
  void close() { start.push_back(static_cast<int64_t>(runs.size())); }
};

// acc (contiguous [nnz][taps][bo][bi]) = dy[:, row block].T @ a[:, tap, column block] over
// the plan's runs. Every thread takes a fixed range of (slot, tap) items (slots in `order`,
// column-sorted: neighbours read the same input columns) and walks the chunks of rows in
// order, so each result is summed by one thread in one order whatever the thread count, and
// a chunk's rows stay in cache across the items. One parallel region, no barrier inside.
void run_sdd(const Isa& isa, const float* dy, int64_t dy_step, const float* a, int64_t a_step, const SddPlan& plan,
             const int32_t* row_idx, const int32_t* col_idx, const int32_t* order, int64_t nnz, int64_t bo,
             int64_t bi, float* acc);

}  // namespace cpu
}  // namespace sparse_kernels
