// CPU implementations of the mask ops: index build, batched prune-and-regrow, block norms.
//
// Layers are independent: at::parallel_for spreads them over torch's intra-op threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../masks.h"
#include "../ops.h"

namespace sparse_kernels {
namespace {

// The row-sorted and column-sorted index of one layer: a counting sort over the flat
// block index. `cells` gets the slot of each of the R x C blocks (-1 where dead); a
// row-major walk over it lists the slots by (row, col), a column-major walk by (col, row).
void build_layer_index(const int32_t* row, const int32_t* col, int64_t nnz, int64_t rows, int64_t cols,
                       std::vector<int32_t>& cells, int32_t* row_ptr, int32_t* row_slots, int32_t* col_ptr,
                       int32_t* col_slots) {
  cells.assign(rows * cols, -1);
  for (int64_t s = 0; s < nnz; ++s) cells[int64_t{row[s]} * cols + col[s]] = static_cast<int32_t>(s);
  int32_t position = 0;
  for (int64_t r = 0; r < rows; ++r) {
    row_ptr[r] = position;
    for (int64_t c = 0; c < cols; ++c) {
      const int32_t s = cells[r * cols + c];
      if (s >= 0) row_slots[position++] = s;
    }
  }
  row_ptr[rows] = position;
  position = 0;
  for (int64_t c = 0; c < cols; ++c) {
    col_ptr[c] = position;
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t s = cells[r * cols + c];
      if (s >= 0) col_slots[position++] = s;
    }
  }
  col_ptr[cols] = position;
}

// The flat indices (low 32 bits) of the `count` smallest keys, in ascending flat order.
std::vector<int32_t> smallest(std::vector<uint64_t>& keys, int64_t count) {
  std::nth_element(keys.begin(), keys.begin() + (count - 1), keys.end());  // keys are unique
  std::vector<int32_t> flat(count);
  for (int64_t i = 0; i < count; ++i) flat[i] = static_cast<int32_t>(keys[i] & 0xFFFFFFFFu);
  std::sort(flat.begin(), flat.end());
  return flat;
}

// Zeroes `bytes` at `row`. Rows are written once and not read again during the update,
// so streaming stores skip the read-for-ownership a cached store pays (half the traffic).
void zero_row(char* row, int64_t bytes) {
#if defined(__SSE2__)
  if (bytes % 64 == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    const __m128i zero = _mm_setzero_si128();
    for (int64_t i = 0; i < bytes; i += 64) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(row + i), zero);
      _mm_stream_si128(reinterpret_cast<__m128i*>(row + i + 16), zero);
      _mm_stream_si128(reinterpret_cast<__m128i*>(row + i + 32), zero);
      _mm_stream_si128(reinterpret_cast<__m128i*>(row + i + 48), zero);
    }
    return;
  }
#endif
  std::memset(row, 0, bytes);
}

struct LayerArgs {
  int32_t* row;
  int32_t* col;
  int64_t nnz, rows, cols, k;
  const float* drop;
  const float* grow;
  int32_t *row_ptr, *row_slots, *col_ptr, *col_slots;
  std::vector<at::Tensor> zero;  // tensors with one row per slot
};

// Drops the `drops` live blocks with the smallest drop keys, then grows as many among the
// candidates with the smallest grow keys: the dead blocks with a finite grow score, and with
// `regrow_dropped` the dropped blocks too (regrow_key). A dropped block that is regrown keeps
// its slot and values; the other dropped slots (ascending) take the newly grown blocks
// (ascending), their rows are zeroed and the index is rebuilt. Returns how many blocks moved.
int64_t update_layer(LayerArgs& a, bool regrow_dropped, std::vector<int32_t>& cells) {
  const int64_t grid = a.rows * a.cols;
  cells.assign(grid, -1);
  for (int64_t s = 0; s < a.nnz; ++s) cells[int64_t{a.row[s]} * a.cols + a.col[s]] = static_cast<int32_t>(s);

  std::vector<uint64_t> grow_keys;
  for (int64_t b = 0; b < grid; ++b) {
    if (cells[b] < 0 && finite_score(a.grow[b])) grow_keys.push_back(grow_key(a.grow[b], static_cast<uint32_t>(b)));
  }
  const int64_t growable_dead = static_cast<int64_t>(grow_keys.size());
  const int64_t drops = regrow_dropped ? std::min(a.k, a.nnz) : std::min({a.k, a.nnz, growable_dead});
  int64_t moved = 0;
  if (drops > 0) {
    std::vector<uint64_t> drop_keys(a.nnz);
    for (int64_t s = 0; s < a.nnz; ++s) {
      drop_keys[s] = drop_key(a.drop[s], static_cast<uint32_t>(int64_t{a.row[s]} * a.cols + a.col[s]));
    }
    const std::vector<int32_t> dropped_blocks = smallest(drop_keys, drops);  // ascending flat index
    if (regrow_dropped) {
      for (const int32_t b : dropped_blocks) grow_keys.push_back(regrow_key(a.grow[b], static_cast<uint32_t>(b)));
    }
    std::vector<int32_t> grown;  // newly live blocks, ascending
    std::vector<char> regrown(a.nnz, 0);  // per slot: dropped and grown again
    for (const int32_t b : smallest(grow_keys, drops)) {
      if (cells[b] < 0) {
        grown.push_back(b);
      } else {
        regrown[cells[b]] = 1;
      }
    }
    std::vector<int32_t> freed;  // slots whose block stays dropped
    for (const int32_t b : dropped_blocks) {
      if (!regrown[cells[b]]) freed.push_back(cells[b]);
    }
    std::sort(freed.begin(), freed.end());
    moved = static_cast<int64_t>(grown.size());
    for (int64_t i = 0; i < moved; ++i) {
      a.row[freed[i]] = static_cast<int32_t>(grown[i] / a.cols);
      a.col[freed[i]] = static_cast<int32_t>(grown[i] % a.cols);
    }
    for (const auto& t : a.zero) {
      const int64_t row_bytes = t.numel() / a.nnz * static_cast<int64_t>(t.element_size());
      char* base = static_cast<char*>(t.data_ptr());
      for (const int32_t s : freed) zero_row(base + s * row_bytes, row_bytes);
    }
#if defined(__SSE2__)
    _mm_sfence();  // order the streaming stores before anything that follows
#endif
  }
  build_layer_index(a.row, a.col, a.nnz, a.rows, a.cols, cells, a.row_ptr, a.row_slots, a.col_ptr, a.col_slots);
  return moved;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_index_cpu(const at::Tensor& row_idx,
                                                                         const at::Tensor& col_idx, int64_t num_rows,
                                                                         int64_t num_cols) {
  check_build_index(row_idx, col_idx, num_rows, num_cols);
  const int64_t nnz = row_idx.numel();
  const auto options = row_idx.options();
  at::Tensor row_ptr = at::empty({num_rows + 1}, options), row_slots = at::empty({nnz}, options);
  at::Tensor col_ptr = at::empty({num_cols + 1}, options), col_slots = at::empty({nnz}, options);
  std::vector<int32_t> cells;
  build_layer_index(row_idx.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), nnz, num_rows, num_cols, cells,
                    row_ptr.data_ptr<int32_t>(), row_slots.data_ptr<int32_t>(), col_ptr.data_ptr<int32_t>(),
                    col_slots.data_ptr<int32_t>());
  return {row_ptr, row_slots, col_ptr, col_slots};
}

at::Tensor prune_and_regrow_cpu(at::TensorList row_idx, at::TensorList col_idx, at::TensorList row_ptr,
                                at::TensorList row_slots, at::TensorList col_ptr, at::TensorList col_slots,
                                at::TensorList drop_scores, at::TensorList grow_scores, c10::IntArrayRef num_rows,
                                c10::IntArrayRef num_cols, c10::IntArrayRef k, at::TensorList zero_tensors,
                                c10::IntArrayRef zero_layer, bool regrow_dropped) {
  const int64_t layers = check_prune_and_regrow(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots,
                                                drop_scores, grow_scores, num_rows, num_cols, k, zero_tensors,
                                                zero_layer);
  std::vector<LayerArgs> args(layers);
  for (int64_t l = 0; l < layers; ++l) {
    args[l] = LayerArgs{row_idx[l].data_ptr<int32_t>(),     col_idx[l].data_ptr<int32_t>(),
                        row_idx[l].numel(),                 num_rows[l],
                        num_cols[l],                        k[l],
                        drop_scores[l].data_ptr<float>(),   grow_scores[l].data_ptr<float>(),
                        row_ptr[l].data_ptr<int32_t>(),     row_slots[l].data_ptr<int32_t>(),
                        col_ptr[l].data_ptr<int32_t>(),     col_slots[l].data_ptr<int32_t>(),
                        {}};
  }
  for (size_t i = 0; i < zero_tensors.size(); ++i) args[zero_layer[i]].zero.push_back(zero_tensors[i]);
  at::Tensor moved = at::zeros({layers}, at::TensorOptions(at::kLong));
  int64_t* moved_ptr = moved.data_ptr<int64_t>();
  at::parallel_for(0, layers, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cells;
    for (int64_t l = begin; l < end; ++l) moved_ptr[l] = update_layer(args[l], regrow_dropped, cells);
  });
  return moved;
}

at::Tensor block_norms_cpu(const at::Tensor& weight_in, int64_t block_out, int64_t block_in) {
  const auto [rows, cols, taps] = check_block_norms(weight_in, block_out, block_in);
  const at::Tensor weight = weight_in.contiguous();
  const int64_t in_features = weight.size(1);
  at::Tensor norms = at::empty({rows, cols}, weight.options().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "block_norms_cpu", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows * cols, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t r = block / cols, c = block % cols;
        float sum = 0.0f;
        for (int64_t o = 0; o < block_out; ++o) {
          const scalar_t* run = w + ((r * block_out + o) * in_features + c * block_in) * taps;
          for (int64_t i = 0; i < block_in * taps; ++i) {
            const float v = static_cast<float>(run[i]);
            sum += v * v;
          }
        }
        out[block] = std::sqrt(sum);
      }
    });
  });
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("build_index", &build_index_cpu);
  m.impl("prune_and_regrow", &prune_and_regrow_cpu);
  m.impl("block_norms", &block_norms_cpu);
}

}  // namespace sparse_kernels
