// The grad-input and grad-weight drivers of vector blocks (vector_blocks.h).
#include "vector_blocks.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace sparse_kernels {
namespace cpu {
namespace {


// ------------------------------------------------------------------------ grad-input geometry
// The planes of one image of dy: channel o at data + o * plane, source pixel (y, x) at
// (y + rows.before) * pitch + x + cols.before, zeros around (a tap reading left of a row's
// pixels reads the previous row's trailing zeros).
struct Planes {
  PhaseAxis rows, cols;
  int64_t pitch, plane, channels;
  // A tap's offset in a plane, from the destination position it serves.
  int64_t offset(int64_t a_row, int64_t a_col) const { return (a_row + rows.before) * pitch + a_col + cols.before; }
};

Planes make_planes(const ConvShape& c, int64_t channels) {
  Planes planes{phase_axis(c.in_h, c.out_h, c.kh, c.stride[0], c.padding[0], c.dilation[0]),
                phase_axis(c.in_w, c.out_w, c.kw, c.stride[1], c.padding[1], c.dilation[1]), 0, 0, channels};
  // Rows share their zero columns: a row's trailing zeros run on into the next row's leading
  // ones, so the pitch is the data's width plus the wider of the two (not both), and no less
  // than a phase's destination width.
  const PhaseAxis& cols = planes.cols;
  planes.pitch = c.out_w + std::max(cols.before, cols.extent - cols.before - c.out_w);
  for (const int64_t count : cols.count) planes.pitch = std::max(planes.pitch, count);
  planes.pitch = std::max<int64_t>(planes.pitch, 1);
  // The farthest float a tile reads: its last position, rounded up to a tile, plus a tap's offset.
  int64_t reach = planes.rows.extent * planes.pitch;
  for (int64_t ry = 0; ry < c.stride[0]; ++ry)
    for (int64_t rx = 0; rx < c.stride[1]; ++rx)
      for (const auto& [i, ay] : planes.rows.taps[ry])
        for (const auto& [j, ax] : planes.cols.taps[rx])
          reach = std::max(reach, ceil_div(planes.rows.count[ry] * planes.pitch, kTileWidth) * kTileWidth + planes.offset(ay, ax));
  // Planes an odd number of 16-float lines apart: the 16 planes a pair reads map to different cache sets.
  planes.plane = ceil_div(reach, 32) * 32 + 16;
  return planes;
}

// Fills positions lo .. hi of the planes of dy's image n, row by row of the padded grid: dy's
// pixels where they are (a transpose per 16 channels from channels-last dy, row copies from
// NCHW), zeros around.
void fill_planes(const Isa& isa, const Planes& P, const Strided& dy, const ConvShape& c, int64_t n, int64_t lo,
                 int64_t hi, float* planes) {
  const int64_t left = P.cols.before, cout = P.channels;
  const float* image = dy.data + n * dy.n_step;
  for (int64_t u = lo / P.pitch; u * P.pitch < hi; ++u) {
    const int64_t a = std::max(lo - u * P.pitch, int64_t{0}), b = std::min(hi - u * P.pitch, P.pitch);
    const int64_t y = u - P.rows.before;
    int64_t d0 = a, d1 = a;  // the columns of the row [a, b) that hold pixels of dy
    if (y >= 0 && y < c.out_h) d0 = std::clamp(left, a, b), d1 = std::clamp(left + c.out_w, a, b);
    for (int64_t o = 0; o < cout; ++o) {
      float* row = planes + o * P.plane + u * P.pitch;
      std::fill(row + a, row + d0, 0.f);
      std::fill(row + d1, row + b, 0.f);
    }
    if (d0 == d1) continue;
    const float* src = image + y * dy.y_step + (d0 - left) * dy.x_step;
    float* dst = planes + u * P.pitch + d0;
    if (dy.x_step == 1) {  // NCHW: rows
      for (int64_t o = 0; o < cout; ++o) std::memcpy(dst + o * P.plane, src + o * dy.c_step, sizeof(float) * (d1 - d0));
    } else if (dy.c_step == 1) {  // channels-last: transposes
      isa.transpose({src, dy.x_step, dst, P.plane, d1 - d0, cout, false});
    } else {  // any other strides
      for (int64_t o = 0; o < cout; ++o)
        for (int64_t x = 0; x < d1 - d0; ++x) dst[o * P.plane + x] = src[o * dy.c_step + x * dy.x_step];
    }
  }
}

// A tile of one image: phase (ry, rx), positions q0 .. q0 + kTileWidth of its grid.
struct TileRange {
  int64_t ry, rx, q0;
};

// Writes the tile's results (local[k][q - q0] for channels k < count) into dx, dropping the
// positions outside the phase's grid: along each row of the grid, a transpose into channels-last
// dx (pixel by pixel), or row copies into NCHW.
void write_tile(const Isa& isa, const float* local, const TileRange& t, const Planes& P, int64_t n, int64_t count,
                const Strided& dx) {
  const int64_t end = std::min(t.q0 + kTileWidth, P.rows.count[t.ry] * P.pitch);
  const int64_t sy = P.rows.stride, sx = P.cols.stride, width = P.cols.count[t.rx];
  float* base = dx.data + n * dx.n_step;
  for (int64_t Y = t.q0 / P.pitch; Y * P.pitch < end; ++Y) {
    const int64_t first = std::max(t.q0, Y * P.pitch), last = std::min(end, Y * P.pitch + width);
    if (first >= last) continue;
    const int64_t X = first - Y * P.pitch;
    float* dst = base + (t.ry + sy * Y) * dx.y_step + (t.rx + sx * X) * dx.x_step;
    const float* src = local + (first - t.q0);
    if (dx.c_step == 1) {
      isa.transpose({src, kTileWidth, dst, sx * dx.x_step, count, last - first, true});
    } else {
      for (int64_t k = 0; k < count; ++k)
        for (int64_t j = 0; j < last - first; ++j) dst[k * dx.c_step + j * sx * dx.x_step] = src[k * kTileWidth + j];
    }
  }
}

// ------------------------------------------------------------------------ grad-weight plan
// A tile of up to kSddItems items (slot, tap) of one output block and one tap: the channel of x
// each reads, where each adds.
struct ItemTile {
  int64_t block, tap, items;
  int64_t offsets[kSddItems];
  float* acc[kSddItems];
};

}  // namespace

void vector_grad_input(const char* op, const Isa& isa, const Strided& dy, const float* packed,
                       const at::Tensor& row_idx, const at::Tensor& col_ptr, const at::Tensor& col_slots,
                       const LayoutShape& L, const ConvShape& c, const Strided& dx) {
  // A 1 x 1 convolution of stride 1 without padding, over images whose pixels follow one another
  // at one stride (channels-last), is the linear layer of all their pixels: one plane, no tile
  // straddling two images' ends.
  const auto one_row = [&](const Strided& t, int64_t h, int64_t w) {
    return t.n_step == h * t.y_step && t.y_step == w * t.x_step;
  };
  if (c.taps() == 1 && c.batch * c.out_h > 1 && c.stride[0] == 1 && c.stride[1] == 1 && c.padding[0] == 0 &&
      c.padding[1] == 0 && one_row(dy, c.out_h, c.out_w) && one_row(dx, c.in_h, c.in_w))
    return vector_grad_input(op, isa, {dy.data, 0, dy.c_step, 0, dy.x_step}, packed, row_idx, col_ptr, col_slots, L,
                             ConvShape::linear(c.batch * c.out_h * c.out_w), {dx.data, 0, dx.c_step, 0, dx.x_step});
  const int64_t cin = L.cols, cout = L.rows * L.bo, taps = c.taps();
  const Planes P = make_planes(c, cout);
  const int32_t* ptr = col_ptr.data_ptr<int32_t>();
  const int32_t* slots = col_slots.data_ptr<int32_t>();
  const int32_t* rows = row_idx.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[cin] == L.nnz, op, ": the index pointer must run from 0 to ", L.nnz);
  for (int64_t j = 0; j < cin; ++j) TORCH_CHECK_VALUE(ptr[j] <= ptr[j + 1], op, ": the index pointer decreases at ", j);
  for (int64_t i = 0; i < L.nnz; ++i) {
    TORCH_CHECK_VALUE(slots[i] >= 0 && slots[i] < L.nnz, op, ": slots[", i, "] = ", slots[i], " is not a slot");
    TORCH_CHECK_VALUE(rows[slots[i]] >= 0 && rows[slots[i]] < L.rows, op, ": row_idx[", slots[i], "] = ",
                      rows[slots[i]], " is not in [0, ", L.rows, ")");
  }
  // The live input channels of each output block (ascending) and their slots.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> fed(L.rows);
  for (int64_t j = 0; j < cin; ++j)
    for (int64_t i = ptr[j]; i < ptr[j + 1]; ++i) fed[rows[slots[i]]].push_back({j, slots[i]});
  // Per phase: its taps' offsets in a plane, and each output block's channels in near-equal
  // chunks of at most kChunkChannels, with the chunk's weights packed [tap][o][channel].
  struct Chunk {
    int64_t block, first, count, w;  // channels[first .. first + count), weights from w
  };
  const int64_t phases = c.stride[0] * c.stride[1];
  std::vector<std::vector<int64_t>> offsets(phases);
  std::vector<std::vector<Chunk>> chunks(phases);
  std::vector<int64_t> channels;
  std::vector<float> weights;
  for (int64_t ry = 0; ry < c.stride[0]; ++ry)
    for (int64_t rx = 0; rx < c.stride[1]; ++rx) {
      const int64_t phase = ry * c.stride[1] + rx;
      std::vector<int64_t> tap_index;
      for (const auto& [ki, ay] : P.rows.taps[ry])
        for (const auto& [kj, ax] : P.cols.taps[rx]) {
          offsets[phase].push_back(P.offset(ay, ax));
          tap_index.push_back(ki * c.kw + kj);
        }
      for (int64_t b = 0; b < L.rows; ++b) {
        const int64_t live = static_cast<int64_t>(fed[b].size()), parts = ceil_div(live, kChunkChannels);
        for (int64_t part = 0; part < parts; ++part) {
          const int64_t j0 = live * part / parts, j1 = live * (part + 1) / parts;
          chunks[phase].push_back({b, static_cast<int64_t>(channels.size()), j1 - j0,
                                   static_cast<int64_t>(weights.size())});
          for (int64_t j = j0; j < j1; ++j) channels.push_back(fed[b][j].first);
          for (const int64_t tap : tap_index)
            for (int64_t o = 0; o < L.bo; ++o)
              for (int64_t j = j0; j < j1; ++j) weights.push_back(packed[(fed[b][j].second * taps + tap) * L.bo + o]);
        }
      }
    }
  // Items: (image, band of kTileWidth-aligned positions of every phase's grid); an image is cut
  // in bands only where there are too few images to keep the threads busy. An item fills the
  // positions of its image's planes that its tiles read into a thread's buffer (in L2 while its
  // tiles read them), then sums each tile over every output block's chunks into a local
  // [cin][kTileWidth] buffer, and writes it.
  int64_t grid = 0;  // positions of the largest phase grid
  for (int64_t ry = 0; ry < c.stride[0]; ++ry) grid = std::max(grid, P.rows.count[ry] * P.pitch);
  const int64_t tiles = ceil_div(grid, kTileWidth);
  const int64_t bands = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), c.batch), 1, std::max<int64_t>(tiles, 1));
  at::parallel_for(0, c.batch * bands, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<float> plane_storage, local_storage;
    float* planes = grow(plane_storage, static_cast<size_t>(cout * P.plane));
    float* local = grow(local_storage, static_cast<size_t>(cin * kTileWidth));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands, band = item % bands;
      const int64_t p0 = tiles * band / bands * kTileWidth, p1 = tiles * (band + 1) / bands * kTileWidth;
      int64_t lo = P.plane, hi = 0;  // the plane positions the band's tiles read
      for (int64_t phase = 0; phase < phases; ++phase) {
        const int64_t positions = P.rows.count[phase / c.stride[1]] * P.pitch;
        if (P.cols.count[phase % c.stride[1]] == 0 || p0 >= positions || offsets[phase].empty()) continue;
        const auto [first, last] = std::minmax_element(offsets[phase].begin(), offsets[phase].end());
        lo = std::min(lo, p0 + *first);
        hi = std::max(hi, std::min(p1, ceil_div(positions, kTileWidth) * kTileWidth) + *last);
      }
      if (lo < hi) fill_planes(isa, P, dy, c, n, lo, std::min(hi, P.plane), planes);
      for (int64_t phase = 0; phase < phases; ++phase) {
        const TileRange base{phase / c.stride[1], phase % c.stride[1], 0};
        const int64_t positions = P.rows.count[base.ry] * P.pitch;
        if (P.cols.count[base.rx] == 0) continue;
        for (int64_t q0 = p0; q0 < std::min(p1, positions); q0 += kTileWidth) {
          const TileRange t{base.ry, base.rx, q0};
          const int64_t width = std::min(kTileWidth, ceil_div(positions - q0, 16) * 16);
          std::memset(local, 0, sizeof(float) * cin * kTileWidth);
          for (const Chunk& k : chunks[phase])
            isa.block_tile({planes + k.block * L.bo * P.plane + q0, P.plane, offsets[phase].data(),
                            static_cast<int64_t>(offsets[phase].size()), L.bo, weights.data() + k.w,
                            channels.data() + k.first, k.count, local, width});
          write_tile(isa, local, t, P, n, cin, dx);
        }
      }
    }
  });
}

void vector_grad_weight(const char* op, const Isa& isa, const float* dy, int64_t dy_stride, const float* x,
                        const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                        const LayoutShape& L, const ConvShape& c, float* acc) {
  const int64_t cin = L.cols, taps = c.taps(), bo = L.bo;
  if (L.nnz > 0) std::memset(acc, 0, sizeof(float) * L.nnz * taps * bo);
  // Per chunk of about kChunkPixels output pixels and per tap, the runs of the chunk's pixels
  // (along output rows) whose tap reads inside x: x is read in place, no padded copy.
  constexpr int64_t kChunkPixels = 64;
  static thread_local SddPlan plan_storage;  // the calling thread's: the workers read it through `plan`
  SddPlan& plan = plan_storage;
  plan.reset(taps);
  const int64_t pixels = c.batch * c.out_h * c.out_w, sx = c.stride[1];
  for (int64_t m0 = 0; m0 < pixels; m0 += kChunkPixels, ++plan.chunks)
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t i = t / c.kw, j = t % c.kw;
      // Output columns [lo, hi) whose tap column lands inside x: x * sx + shift in [0, in_w).
      const int64_t shift = j * c.dilation[1] - c.padding[1];
      const int64_t lo = shift >= 0 ? 0 : (-shift + sx - 1) / sx;
      const int64_t hi = c.in_w - 1 - shift < 0 ? 0 : std::min(c.out_w, (c.in_w - 1 - shift) / sx + 1);
      for (int64_t m = m0; m < std::min(pixels, m0 + kChunkPixels);) {
        const int64_t row = m / c.out_w, x0 = m % c.out_w, n = row / c.out_h, y = row % c.out_h;
        const int64_t x1 = std::min(c.out_w, x0 + m0 + kChunkPixels - m);
        const int64_t sy = y * c.stride[0] + i * c.dilation[0] - c.padding[0];
        const int64_t first = std::max(x0, lo), last = std::min(x1, hi);
        if (sy >= 0 && sy < c.in_h && first < last)
          plan.add((row * c.out_w + first) * dy_stride, ((n * c.in_h + sy) * c.in_w + first * sx + shift) * cin,
                   last - first, dy_stride, sx * cin);
        m += x1 - x0;
      }
      plan.close();
    }
  // Tiles of items of one output block and one tap (slots in row order): they share the runs,
  // and each row's inputs are channels of one pixel of x.
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  const int32_t* slots = row_slots.data_ptr<int32_t>();
  const int32_t* cols = col_idx.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[L.rows] == L.nnz, op, ": the index pointer must run from 0 to ", L.nnz);
  for (int64_t b = 0; b < L.rows; ++b) TORCH_CHECK_VALUE(ptr[b] <= ptr[b + 1], op, ": the index pointer decreases at ", b);
  // A block's slots are split into near-equal tiles (9 slots: 5 + 4, not 8 + 1).
  std::vector<ItemTile> tiles;
  for (int64_t b = 0; b < L.rows; ++b) {
    const int64_t live = ptr[b + 1] - ptr[b], parts = ceil_div(live, kSddItems);
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t part = 0; part < parts; ++part) {
        ItemTile& tile = tiles.emplace_back(ItemTile{b, t, 0, {}, {}});
        for (int64_t i = ptr[b] + live * part / parts; i < ptr[b] + live * (part + 1) / parts; ++i) {
          tile.offsets[tile.items] = cols[slots[i]];
          tile.acc[tile.items++] = acc + (slots[i] * taps + t) * bo;
        }
      }
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = 0; chunk < plan.chunks; ++chunk)
      for (int64_t i = begin; i < end; ++i) {
        const ItemTile& tile = tiles[i];
        const int64_t first = plan.start[chunk * taps + tile.tap], runs = plan.start[chunk * taps + tile.tap + 1] - first;
        if (runs > 0)
          isa.sdd_vector({dy + tile.block * bo, dy_stride, x, sx * cin, plan.runs.data() + first, runs, tile.offsets,
                          tile.acc, tile.items, bo});
      }
  });
}

}  // namespace cpu
}  // namespace sparse_kernels
