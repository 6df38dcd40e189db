// Declarations shared by the implementations of the sparse_kernels ops (CPU, CUDA, autograd).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
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

// ---------------------------------------------------------------------------------------
// The block-sparse linear and conv2d ops take a layout as its six int32 index tensors, in
// the order of BlockSparseLayout.tensors(): row_idx, col_idx (the block of each slot),
// row_ptr, row_slots (row-sorted index), col_ptr, col_slots (column-sorted index).
struct LayoutIndex {
  const at::Tensor& row_idx;
  const at::Tensor& col_idx;
  const at::Tensor& row_ptr;
  const at::Tensor& row_slots;
  const at::Tensor& col_ptr;
  const at::Tensor& col_slots;
};

// A layout's sizes: live blocks, the block grid [rows, cols] and the block sides.
struct LayoutShape {
  int64_t nnz, rows, cols, bo, bi;
};

// Checks the index's metadata (dtype, shape, device; no data is read, so any device and
// fake tensors pass through) against `nnz` live blocks on `device`; returns the grid.
LayoutShape check_index(const char* op, const LayoutIndex& index, int64_t nnz, int64_t bo, int64_t bi,
                        c10::Device device);

// Checks values [nnz, bo, bi, *taps] (floating point, `taps` trailing dims) and its index.
LayoutShape check_layout(const char* op, const at::Tensor& values, const LayoutIndex& index, int64_t taps);

// Refuses an operand that is not in the dtype of `like` (named `like_name`) on its device.
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                   const char* like_name = "values");

// Refuses a bias that is not [features] in `like`'s dtype on its device.
void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t features, const at::Tensor& like);

// "torch.float32"-style names for error messages.
std::string dtype_name(at::ScalarType type);

namespace cpu {
// The instruction set the CPU block-sparse kernels run with: "avx512", "avx2" or "generic".
std::string selected_isa();

// Whether the compiled CPU kernels take this case (fp32, fp16 or bf16, computed in fp32; block sides
// multiples of 16, or vector blocks: bo a multiple of 8 by bi = 1). The rest runs on the masked-dense reference path: the live blocks scattered
// into a dense weight, and ATen's dense op. The one statement of the rule: the kernels ask it, and
// so does Python through the op sparse_kernels::cpu_kernels_take (cpu/driver.cpp).
bool kernels_take(at::ScalarType dtype, int64_t bo, int64_t bi);
}  // namespace cpu

}  // namespace sparse_kernels
