// Declarations shared by the CPU and CUDA implementations of the sparse_kernels ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <string>

namespace sparse_kernels {

// Argument checks of prune_and_regrow, shared by both devices (ValueError / TypeError).
// Returns the number of layers.
int64_t check_prune_and_regrow(
    at::TensorList row_idx, at::TensorList col_idx, at::TensorList row_ptr, at::TensorList row_slots,
    at::TensorList col_ptr, at::TensorList col_slots, at::TensorList drop_scores, at::TensorList grow_scores,
    c10::IntArrayRef num_rows, c10::IntArrayRef num_cols, c10::IntArrayRef k, at::TensorList zero_tensors,
    c10::IntArrayRef zero_layer);

void check_build_index(const at::Tensor& row_idx, const at::Tensor& col_idx, int64_t num_rows, int64_t num_cols);

// The block grid of a weight [out, in, *taps] for block_norms: rows, cols and taps per element.
struct BlockGrid {
  int64_t rows, cols, taps;
};

// Checks block_norms' arguments (ValueError / TypeError) and returns the block grid.
BlockGrid check_block_norms(const at::Tensor& weight, int64_t block_out, int64_t block_in);

namespace cpu {
// The instruction set the CPU block-sparse kernels run with: "avx512", "avx2" or "generic".
std::string selected_isa();
}  // namespace cpu

}  // namespace sparse_kernels
