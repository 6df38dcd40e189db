// The plain interface between the CPU kernels' drivers (driver.h) and their vectorised inner
// loops (microkernels.h), compiled once per instruction set.
#pragma once

#include <cstdint>

namespace sparse_kernels {
namespace cpu {

// The dense operand of a dsd product is packed, a tile of rows at a time, into a panel of
// columns of 16 floats: a column holds `panel_rows` rows of 16 consecutive floats of the
// operand, so inner loops address every row at a fixed offset from one pointer.
constexpr int64_t kPanelWidth = 16;
// Rows per tile when tiles are plain runs of rows (and the most a register tile covers).
constexpr int64_t kPanelRows = 24;

// One live (block, tap) pair feeding a block of outputs: its k inputs start at
// groups[group] + offset (row 0 of the first column; the next k / 16 - 1 columns follow,
// column_stride floats apart), and its packed weights w are [k][n], row-major. A pair of a
// vector block (one input channel) has k = 1: its input is the float at groups[group] + offset
// (a lane of a column), the next rows 16 floats on.
struct DsdPair {
  int64_t group, offset;
  const float* w;
};

// out[r, 0:n] = bias[0:n] + sum over pairs p, kk < k of panel(p, r, kk) * p.w[kk, :] for
// r < rows (<= kPanelRows); k is 1 or a multiple of 16, n a multiple of 8. Output rows are ldo
// floats apart. A panel is packed in groups of columns (a tap, or a kernel row), each at its own address.
// Pairs of vector blocks (k = 1) may come in triples (`triples`): three taps of one kernel row
// whose inputs are the same panel column at rows shifted by 0, 1 and 2 (a 3-wide kernel of
// dilation 1), so that each panel value, broadcast once, feeds all three.
struct DsdTile {
  const float* const* groups;
  int64_t column_stride;
  const DsdPair* pairs;
  int64_t npairs, k, n;
  const float* bias;  // nullptr: zero
  float* out;
  int64_t ldo, rows;
  bool triples;
};

// One group of a panel to pack: for every panel row r < rows, pixels[r] points at the channels
// of a source pixel (nullptr: zeros). Column j (column_rows >= rows rows high) holds the 16
// floats used[j] * 16 onwards of each pixel, those from `channels` on read as zeros.
struct PanelSource {
  const float* const* pixels;
  int64_t rows, column_rows;
  const int64_t* used;
  int64_t nused, channels;
  float* panel;
};

// A run of `rows` consecutive reduction rows: row m reads dy at dy + m * dy_step and a at
// a + m * a_step (offsets in floats from SddBlock's pointers).
struct SddRun {
  int64_t dy, a, rows;
};

// acc[0:bo, 0:bi] += sum over runs and their rows m of dy(m)[0:bo].T @ a(m)[0:bi]; bo and bi
// are multiples of 16, acc is contiguous [bo][bi].
struct SddBlock {
  const float* dy;
  int64_t dy_step;
  const float* a;
  int64_t a_step;
  const SddRun* runs;
  int64_t nruns, bo, bi;
  float* acc;
};

// ---------------------------------------------------------------------- vector blocks
// The grad-input of vector blocks (bo output channels x 1 input channel) has one output channel
// per block: it is computed channel-major, output pixels along the vector lanes, from planes
// (a channel's pixels in a row, zero-padded; vector_blocks.h), a tile of kTileWidth consecutive
// positions at a time.
constexpr int64_t kTileWidth = 64;

// One output block's share of a tile, for a chunk of the input channels it feeds (at most
// kChunkChannels): out[channels[j] * kTileWidth + q] += sum over taps t < ntaps, o < bo of
// w[(t * bo + o) * count + j] * src[offsets[t] + o * plane + q], for j < count, q < width (a
// multiple of 16, at most kTileWidth).
// The block's bo planes start at src, plane floats apart; a tap reads them offsets[t] on. Each
// vector of a plane feeds `count` fused multiply-adds, one per channel's broadcast weight.
constexpr int64_t kChunkChannels = 6;
struct BlockTile {
  const float* src;
  int64_t plane;
  const int64_t* offsets;
  int64_t ntaps, bo;
  const float* w;
  const int64_t* channels;
  int64_t count;
  float* out;
  int64_t width;
};

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols (any sizes), in
// square blocks: along the rows of src (j inner), or down its columns when `rows_inner`. The
// inner loop runs along the channels of a channels-last side, whose memory it then walks in order.
struct Transpose {
  const float* src;
  int64_t src_stride;
  float* dst;
  int64_t dst_stride, rows, cols;
  bool rows_inner;
};

// The grad-weight of vector blocks: items (slot, tap) of one output block and one tap share the rows of dy;
// acc[j][0:bo] += sum over runs and their rows m of a(m)[offsets[j]] * dy(m)[0:bo] for j < items
// (<= kSddItems); bo is a multiple of 8. Row m reads dy + run.dy + m * dy_step and a + run.a + m * a_step.
constexpr int64_t kSddItems = 8;
struct SddVectorTile {
  const float* dy;
  int64_t dy_step;
  const float* a;
  int64_t a_step;
  const SddRun* runs;
  int64_t nruns;
  const int64_t* offsets;
  float* const* acc;
  int64_t items, bo;
};

// ---------------------------------------------------------------------- GroupNorm + SiLU
// `rows` channels-last pixels of `channels` floats each (rows `channels` floats apart) at x, dy
// and out; per-channel arrays scale, shift (z = x * scale + shift), ga, gb and the fp32 sums.
// norm_moments sums x - shift and its square; norm_silu writes y; norm_silu_grad_sums writes dz = dy * silu'(z)
// to out and sums dz and dz * x; norm_silu_grad turns out's dz into dx = scale dz + ga x + gb (and
// sums dx where sum is set).
struct NormRows {
  const float* x;
  const float* dy;
  int64_t rows, channels;
  const float* scale;
  const float* shift;
  const float* ga;
  const float* gb;
  float* out;
  float* sum;
  float* sum2;
};

struct Isa {
  const char* name;
  void (*dsd)(const DsdTile&);
  void (*sdd)(const SddBlock&);
  void (*pack)(const PanelSource&);
  void (*block_tile)(const BlockTile&);
  void (*sdd_vector)(const SddVectorTile&);
  void (*transpose)(const Transpose&);
  void (*norm_moments)(const NormRows&);
  void (*norm_silu)(const NormRows&);
  void (*norm_silu_grad_sums)(const NormRows&);
  void (*norm_silu_grad)(const NormRows&);
};

#define SPARSE_KERNELS_DECLARE_ISA(NAME)     \
  namespace NAME {                           \
  void dsd(const DsdTile&);                  \
  void sdd(const SddBlock&);                 \
  void pack(const PanelSource&);             \
  void block_tile(const BlockTile&);         \
  void sdd_vector(const SddVectorTile&);     \
  void transpose(const Transpose&);          \
  void norm_moments(const NormRows&);        \
  void norm_silu(const NormRows&);           \
  void norm_silu_grad_sums(const NormRows&); \
  void norm_silu_grad(const NormRows&);      \
  }

SPARSE_KERNELS_DECLARE_ISA(generic)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_KERNELS_X86_ISAS 1
SPARSE_KERNELS_DECLARE_ISA(avx2)
SPARSE_KERNELS_DECLARE_ISA(avx512)
#endif

}  // namespace cpu
}  // namespace sparse_kernels
