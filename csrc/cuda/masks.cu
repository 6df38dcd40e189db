// CUDA implementations of the mask ops: index build, batched prune-and-regrow, block norms.
//
// prune_and_regrow runs every layer of a model in one launch, one thread block per layer,
// with no host synchronisation: the per-layer pointers travel in a small metadata buffer
// copied asynchronously from pinned memory. Inside a block:
//   1. cells[b] = slot of block b (or -1): the layer's R x C grid, in a workspace;
//   2. drops = min(k, nnz) (without regrow_dropped, also at most the dead blocks with a
//      finite grow score);
//   3. radix-select the drops-th smallest drop key, then the drops-th smallest grow key
//      among the candidates: dead blocks with a finite score and, with regrow_dropped, the
//      dropped blocks (masks.h: unique 64-bit keys, so the selected sets match the CPU's);
//   4. compact the freed slots (dropped, not grown again) and the newly grown blocks, each
//      in ascending order, pair them, rewrite (row, col) and zero the slots' rows in every
//      given tensor;
//   5. rebuild the row- and column-sorted index by scanning the grid (a counting sort).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../masks.h"
#include "../ops.h"

namespace sparse_kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kItems = 8;  // consecutive elements per thread in a scan tile

struct LayerMeta {
  int32_t* row;
  int32_t* col;
  int32_t* row_ptr;
  int32_t* row_slots;
  int32_t* col_ptr;
  int32_t* col_slots;
  const float* drop;
  const float* grow;
  int32_t* cells;    // workspace [rows * cols]
  int32_t* dropped;  // workspace [nnz]
  int32_t* grown;    // workspace [nnz]
  int64_t nnz, rows, cols, k;
  int64_t zero_begin, zero_end;  // this layer's entries of the zero table
};

struct ZeroMeta {
  char* data;
  int64_t row_bytes;
};

using BlockReduceInt = cub::BlockReduce<int, kThreads>;
using BlockScanInt = cub::BlockScan<int, kThreads>;

struct Shared {
  union {
    typename BlockReduceInt::TempStorage reduce;
    typename BlockScanInt::TempStorage scan;
  } temp;
  int value;
};

__device__ int block_sum(int local, Shared& shared) {
  const int total = BlockReduceInt(shared.temp.reduce).Sum(local);
  if (threadIdx.x == 0) shared.value = total;
  __syncthreads();
  const int result = shared.value;
  __syncthreads();
  return result;
}

// Walks i = 0 .. n-1 in order; visit(i, position, flagged) sees, for every i, how many
// flagged elements precede it. Returns the number of flagged elements.
template <typename Flag, typename Visit>
__device__ int64_t scan_walk(int64_t n, Flag flag, Visit visit, Shared& shared) {
  int64_t carry = 0;
  for (int64_t tile = 0; tile < n; tile += int64_t{kThreads} * kItems) {
    const int64_t base = tile + int64_t{threadIdx.x} * kItems;
    bool flags[kItems];
    int count = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      flags[j] = base + j < n && flag(base + j);
      count += flags[j];
    }
    int offset, total;
    BlockScanInt(shared.temp.scan).ExclusiveSum(count, offset, total);
    __syncthreads();
    int64_t position = carry + offset;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (base + j < n) visit(base + j, position, flags[j]);
      position += flags[j];
    }
    carry += total;
  }
  __syncthreads();
  return carry;
}

// The count-th smallest key among the candidates i in [0, n) (MSB-first radix select).
// key_of(i, key) returns whether i is a candidate. Bits [low_bits, 32) are zero in every
// key (the flat index is below 2^low_bits) and are skipped.
template <typename KeyOf>
__device__ uint64_t kth_smallest(int64_t count, int64_t n, int low_bits, KeyOf key_of, Shared& shared) {
  uint64_t prefix = 0;
  for (int bit = 63; bit >= 0; --bit) {
    if (bit < 32 && bit >= low_bits) continue;
    const uint64_t high = bit == 63 ? 0 : ~uint64_t{0} << (bit + 1);
    int local = 0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      uint64_t key;
      if (key_of(i, key) && (key & high) == prefix && !((key >> bit) & 1)) ++local;
    }
    const int zeros = block_sum(local, shared);
    if (count > zeros) {
      count -= zeros;
      prefix |= uint64_t{1} << bit;
    }
  }
  return prefix;
}

__device__ void fill_cells(const LayerMeta& layer) {
  const int64_t grid = layer.rows * layer.cols;
  for (int64_t b = threadIdx.x; b < grid; b += kThreads) layer.cells[b] = -1;
  __syncthreads();
  for (int64_t s = threadIdx.x; s < layer.nnz; s += kThreads) {
    layer.cells[int64_t{layer.row[s]} * layer.cols + layer.col[s]] = static_cast<int32_t>(s);
  }
  __syncthreads();
}

__device__ void build_index_block(const LayerMeta& layer, Shared& shared) {
  fill_cells(layer);
  const int64_t rows = layer.rows, cols = layer.cols, grid = rows * cols;
  const int32_t* cells = layer.cells;
  const int64_t in_rows = scan_walk(
      grid, [&](int64_t i) { return cells[i] >= 0; },
      [&](int64_t i, int64_t position, bool live) {
        if (i % cols == 0) layer.row_ptr[i / cols] = static_cast<int32_t>(position);
        if (live) layer.row_slots[position] = cells[i];
      },
      shared);
  const int64_t in_cols = scan_walk(
      grid, [&](int64_t i) { return cells[(i % rows) * cols + i / rows] >= 0; },
      [&](int64_t i, int64_t position, bool live) {
        if (i % rows == 0) layer.col_ptr[i / rows] = static_cast<int32_t>(position);
        if (live) layer.col_slots[position] = cells[(i % rows) * cols + i / rows];
      },
      shared);
  if (threadIdx.x == 0) {
    layer.row_ptr[rows] = static_cast<int32_t>(in_rows);
    layer.col_ptr[cols] = static_cast<int32_t>(in_cols);
  }
  if (grid == 0) {  // no walk wrote the pointers: every row / column is empty
    for (int64_t r = threadIdx.x; r < rows; r += kThreads) layer.row_ptr[r] = 0;
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) layer.col_ptr[c] = 0;
  }
}

__device__ void zero_rows(const ZeroMeta& zero, const int32_t* slots, int64_t count) {
  if (zero.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(zero.data) % 16 == 0) {
    const int64_t words = zero.row_bytes / 16;
    for (int64_t i = threadIdx.x; i < count * words; i += kThreads) {
      reinterpret_cast<uint4*>(zero.data + slots[i / words] * zero.row_bytes)[i % words] = make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int64_t i = threadIdx.x; i < count * zero.row_bytes; i += kThreads) {
      zero.data[slots[i / zero.row_bytes] * zero.row_bytes + i % zero.row_bytes] = 0;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    prune_and_regrow_kernel(const LayerMeta* layers, const ZeroMeta* zeros, bool regrow_dropped, int64_t* moved_out) {
  __shared__ Shared shared;
  const LayerMeta layer = layers[blockIdx.x];
  const int64_t grid = layer.rows * layer.cols;
  int64_t moved = 0;
  if (layer.k > 0 && layer.nnz > 0) {
    fill_cells(layer);
    const int32_t* cells = layer.cells;
    const float* grow = layer.grow;
    const float* drop = layer.drop;
    int64_t drops = layer.k < layer.nnz ? layer.k : layer.nnz;
    if (!regrow_dropped) {  // only dead blocks with a finite score can grow: at most that many move
      int local = 0;
      for (int64_t b = threadIdx.x; b < grid; b += kThreads) local += cells[b] < 0 && finite_score(grow[b]);
      const int64_t candidates = block_sum(local, shared);
      drops = drops < candidates ? drops : candidates;
    }
    if (drops > 0) {
      int low_bits = 0;
      while ((int64_t{1} << low_bits) < grid) ++low_bits;
      auto flat_of = [&](int64_t s) { return int64_t{layer.row[s]} * layer.cols + layer.col[s]; };
      auto drop_key_of = [&](int64_t s, uint64_t& key) {
        key = drop_key(drop[s], static_cast<uint32_t>(flat_of(s)));
        return true;
      };
      const uint64_t drop_limit = kth_smallest(drops, layer.nnz, low_bits, drop_key_of, shared);
      auto is_dropped = [&](int64_t s) {
        uint64_t key;
        drop_key_of(s, key);
        return key <= drop_limit;
      };
      // Candidates: dead blocks with a finite score, and (regrow_dropped) the dropped blocks.
      auto grow_key_of = [&](int64_t b, uint64_t& key) {
        const int32_t s = cells[b];
        if (s < 0) {
          key = grow_key(grow[b], static_cast<uint32_t>(b));
          return finite_score(grow[b]);
        }
        key = regrow_key(grow[b], static_cast<uint32_t>(b));
        return regrow_dropped && is_dropped(s);
      };
      const uint64_t grow_limit = kth_smallest(drops, grid, low_bits, grow_key_of, shared);
      auto is_grown = [&](int64_t b) {
        uint64_t key;
        return grow_key_of(b, key) && key <= grow_limit;
      };
      // Freed slots: dropped and not grown again (ascending); new blocks: grown and dead before.
      moved = scan_walk(
          layer.nnz, [&](int64_t s) { return is_dropped(s) && !is_grown(flat_of(s)); },
          [&](int64_t s, int64_t position, bool freed) {
            if (freed) layer.dropped[position] = static_cast<int32_t>(s);
          },
          shared);
      scan_walk(
          grid, [&](int64_t b) { return cells[b] < 0 && is_grown(b); },
          [&](int64_t b, int64_t position, bool grown) {
            if (grown) layer.grown[position] = static_cast<int32_t>(b);
          },
          shared);
      for (int64_t i = threadIdx.x; i < moved; i += kThreads) {
        const int32_t slot = layer.dropped[i], block = layer.grown[i];
        layer.row[slot] = static_cast<int32_t>(block / layer.cols);
        layer.col[slot] = static_cast<int32_t>(block % layer.cols);
      }
      for (int64_t z = layer.zero_begin; z < layer.zero_end; ++z) zero_rows(zeros[z], layer.dropped, moved);
      __syncthreads();
    }
  }
  build_index_block(layer, shared);
  if (threadIdx.x == 0 && moved_out != nullptr) moved_out[blockIdx.x] = moved;
}

// Copies a host array of trivially copyable structs to the device without a host sync.
template <typename T>
at::Tensor to_device(const std::vector<T>& items, const c10::Device& device) {
  const int64_t bytes = static_cast<int64_t>(items.size() * sizeof(T));
  at::Tensor host = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions(at::kByte).pinned_memory(true));
  if (bytes > 0) std::memcpy(host.data_ptr(), items.data(), bytes);
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

void launch(std::vector<LayerMeta>& metas, const std::vector<ZeroMeta>& zero_metas, bool regrow_dropped,
            int64_t* moved, const c10::Device& device) {
  if (metas.empty()) return;
  int64_t workspace_size = 0;
  for (const auto& m : metas) workspace_size += m.rows * m.cols + 2 * m.nnz;
  at::Tensor workspace = at::empty({std::max<int64_t>(workspace_size, 1)}, at::TensorOptions(at::kInt).device(device));
  int32_t* next = workspace.data_ptr<int32_t>();
  for (auto& m : metas) {
    m.cells = next;
    m.dropped = next + m.rows * m.cols;
    m.grown = m.dropped + m.nnz;
    next = m.grown + m.nnz;
  }
  const at::Tensor layers = to_device(metas, device);
  const at::Tensor zeros = to_device(zero_metas, device);
  prune_and_regrow_kernel<<<static_cast<unsigned>(metas.size()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const LayerMeta*>(layers.data_ptr()), reinterpret_cast<const ZeroMeta*>(zeros.data_ptr()),
      regrow_dropped, moved);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_index_cuda(const at::Tensor& row_idx,
                                                                          const at::Tensor& col_idx,
                                                                          int64_t num_rows, int64_t num_cols) {
  check_build_index(row_idx, col_idx, num_rows, num_cols);
  const c10::cuda::CUDAGuard guard(row_idx.device());
  const int64_t nnz = row_idx.numel();
  const auto options = row_idx.options();
  at::Tensor row_ptr = at::empty({num_rows + 1}, options), row_slots = at::empty({nnz}, options);
  at::Tensor col_ptr = at::empty({num_cols + 1}, options), col_slots = at::empty({nnz}, options);
  std::vector<LayerMeta> metas{LayerMeta{row_idx.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                                         row_ptr.data_ptr<int32_t>(), row_slots.data_ptr<int32_t>(),
                                         col_ptr.data_ptr<int32_t>(), col_slots.data_ptr<int32_t>(), nullptr, nullptr,
                                         nullptr, nullptr, nullptr, nnz, num_rows, num_cols, /*k=*/0, 0, 0}};
  launch(metas, {}, /*regrow_dropped=*/false, nullptr, row_idx.device());
  return {row_ptr, row_slots, col_ptr, col_slots};
}

at::Tensor prune_and_regrow_cuda(at::TensorList row_idx, at::TensorList col_idx, at::TensorList row_ptr,
                                 at::TensorList row_slots, at::TensorList col_ptr, at::TensorList col_slots,
                                 at::TensorList drop_scores, at::TensorList grow_scores, c10::IntArrayRef num_rows,
                                 c10::IntArrayRef num_cols, c10::IntArrayRef k, at::TensorList zero_tensors,
                                 c10::IntArrayRef zero_layer, bool regrow_dropped) {
  const int64_t layers = check_prune_and_regrow(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots,
                                                drop_scores, grow_scores, num_rows, num_cols, k, zero_tensors,
                                                zero_layer);
  if (layers == 0) return at::empty({0}, at::kLong);
  const c10::Device device = row_idx[0].device();
  const c10::cuda::CUDAGuard guard(device);
  // The zero table, grouped by layer.
  std::vector<std::vector<ZeroMeta>> by_layer(layers);
  for (size_t i = 0; i < zero_tensors.size(); ++i) {
    const at::Tensor& t = zero_tensors[i];
    const int64_t nnz = row_idx[zero_layer[i]].numel();
    const int64_t row_bytes = nnz ? t.numel() / nnz * static_cast<int64_t>(t.element_size()) : 0;
    by_layer[zero_layer[i]].push_back(ZeroMeta{static_cast<char*>(t.data_ptr()), row_bytes});
  }
  std::vector<ZeroMeta> zero_metas;
  std::vector<LayerMeta> metas(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t begin = static_cast<int64_t>(zero_metas.size());
    zero_metas.insert(zero_metas.end(), by_layer[l].begin(), by_layer[l].end());
    metas[l] = LayerMeta{row_idx[l].data_ptr<int32_t>(),   col_idx[l].data_ptr<int32_t>(),
                         row_ptr[l].data_ptr<int32_t>(),   row_slots[l].data_ptr<int32_t>(),
                         col_ptr[l].data_ptr<int32_t>(),   col_slots[l].data_ptr<int32_t>(),
                         drop_scores[l].data_ptr<float>(), grow_scores[l].data_ptr<float>(),
                         nullptr,                          nullptr,
                         nullptr,                          row_idx[l].numel(),
                         num_rows[l],                      num_cols[l],
                         k[l],                             begin,
                         static_cast<int64_t>(zero_metas.size())};
  }
  at::Tensor moved = at::empty({layers}, row_idx[0].options().dtype(at::kLong));
  launch(metas, zero_metas, regrow_dropped, moved.data_ptr<int64_t>(), device);
  return moved;
}

template <typename scalar_t>
__global__ void block_norms_kernel(const scalar_t* weight, float* norms, int64_t cols, int64_t block_out,
                                   int64_t block_in, int64_t in_features, int64_t taps) {
  using BlockReduceFloat = cub::BlockReduce<float, 256>;
  __shared__ typename BlockReduceFloat::TempStorage temp;
  const int64_t block = blockIdx.x, r = block / cols, c = block % cols;
  const int64_t run = block_in * taps;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < block_out * run; i += blockDim.x) {
    const int64_t o = i / run;
    const float v = static_cast<float>(weight[((r * block_out + o) * in_features + c * block_in) * taps + i % run]);
    sum += v * v;
  }
  const float total = BlockReduceFloat(temp).Sum(sum);
  if (threadIdx.x == 0) norms[block] = sqrtf(total);
}

at::Tensor block_norms_cuda(const at::Tensor& weight_in, int64_t block_out, int64_t block_in) {
  const auto [rows, cols, taps] = check_block_norms(weight_in, block_out, block_in);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor norms = at::empty({rows, cols}, weight.options().dtype(at::kFloat));
  if (rows * cols == 0) return norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "block_norms_cuda", [&] {
    block_norms_kernel<scalar_t><<<static_cast<unsigned>(rows * cols), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        weight.data_ptr<scalar_t>(), norms.data_ptr<float>(), cols, block_out, block_in, weight.size(1), taps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CUDA, m) {
  m.impl("build_index", &build_index_cuda);
  m.impl("prune_and_regrow", &prune_and_regrow_cuda);
  m.impl("block_norms", &block_norms_cuda);
}

}  // namespace sparse_kernels
