// The schemas of the compiled ops, declared once; argument checks shared by the devices.
// Implementations: cpu/*.cpp (CPU) and cuda/masks.cu (CUDA).
#include "ops.h"

#include <Python.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#ifndef SPARSE_KERNELS_BUILD_INFO
#define SPARSE_KERNELS_BUILD_INFO "unknown"
#endif

namespace sparse_kernels {
namespace {

void check_index_vector(const at::Tensor& t, const char* name, int64_t size, c10::Device device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, name, " must have shape [", size, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but row_idx is on ", device);
}

// What setup.py built, e.g. "cpu;cuda=13.0;archs=8.0 9.0;torch=2.14.1+cu130".
std::string build_info() { return SPARSE_KERNELS_BUILD_INFO; }

}  // namespace

void check_build_index(const at::Tensor& row_idx, const at::Tensor& col_idx, int64_t num_rows, int64_t num_cols) {
  TORCH_CHECK_VALUE(num_rows >= 0 && num_cols >= 0, "grid must be non-negative, got ", num_rows, " x ", num_cols);
  TORCH_CHECK_VALUE(num_rows * num_cols < (int64_t{1} << 31), "grid ", num_rows, " x ", num_cols, " is too large");
  check_index_vector(row_idx, "row_idx", row_idx.numel(), row_idx.device());
  check_index_vector(col_idx, "col_idx", row_idx.numel(), row_idx.device());
}

int64_t check_prune_and_regrow(
    at::TensorList row_idx, at::TensorList col_idx, at::TensorList row_ptr, at::TensorList row_slots,
    at::TensorList col_ptr, at::TensorList col_slots, at::TensorList drop_scores, at::TensorList grow_scores,
    c10::IntArrayRef num_rows, c10::IntArrayRef num_cols, c10::IntArrayRef k, at::TensorList zero_tensors,
    c10::IntArrayRef zero_layer) {
  const int64_t layers = static_cast<int64_t>(row_idx.size());
  const size_t n = row_idx.size();
  TORCH_CHECK_VALUE(col_idx.size() == n && row_ptr.size() == n && row_slots.size() == n && col_ptr.size() == n &&
                        col_slots.size() == n && drop_scores.size() == n && grow_scores.size() == n &&
                        num_rows.size() == n && num_cols.size() == n && k.size() == n,
                    "prune_and_regrow: every per-layer list must have ", n, " entries");
  TORCH_CHECK_VALUE(zero_tensors.size() == zero_layer.size(), "prune_and_regrow: zero_tensors has ",
                    zero_tensors.size(), " entries but zero_layer has ", zero_layer.size());
  if (layers == 0) {
    TORCH_CHECK_VALUE(zero_tensors.empty(), "prune_and_regrow: zero_tensors given, but there are no layers");
    return 0;
  }
  const c10::Device device = row_idx[0].device();
  for (size_t l = 0; l < n; ++l) {
    const int64_t nnz = row_idx[l].numel(), rows = num_rows[l], cols = num_cols[l];
    check_build_index(row_idx[l], col_idx[l], rows, cols);
    TORCH_CHECK_VALUE(row_idx[l].device() == device, "layer ", l, " is on ", row_idx[l].device(), ", layer 0 on ",
                      device);
    check_index_vector(row_ptr[l], "row_ptr", rows + 1, device);
    check_index_vector(row_slots[l], "row_slots", nnz, device);
    check_index_vector(col_ptr[l], "col_ptr", cols + 1, device);
    check_index_vector(col_slots[l], "col_slots", nnz, device);
    TORCH_CHECK_VALUE(k[l] >= 0, "layer ", l, ": k must be >= 0, got ", k[l]);
    for (const auto& [scores, name, size] :
         {std::tuple{drop_scores[l], "drop_scores", nnz}, std::tuple{grow_scores[l], "grow_scores", rows * cols}}) {
      TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, "layer ", l, ": ", name, " must be float32, got ",
                       scores.scalar_type());
      TORCH_CHECK_VALUE(scores.numel() == size && scores.is_contiguous(), "layer ", l, ": ", name,
                        " must be contiguous with ", size, " elements, got shape ", scores.sizes());
      TORCH_CHECK_VALUE(scores.device() == device, "layer ", l, ": ", name, " is on ", scores.device());
    }
  }
  for (size_t i = 0; i < zero_tensors.size(); ++i) {
    const auto& t = zero_tensors[i];
    const int64_t l = zero_layer[i];
    TORCH_CHECK_VALUE(l >= 0 && l < layers, "zero_layer[", i, "] = ", l, " is not a layer index");
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == row_idx[l].numel() && t.is_contiguous(), "zero_tensors[", i,
                      "] must be contiguous with ", row_idx[l].numel(), " rows (the slots of layer ", l,
                      "), got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == device, "zero_tensors[", i, "] is on ", t.device());
  }
  return layers;
}

BlockGrid check_block_norms(const at::Tensor& weight, int64_t block_out, int64_t block_in) {
  TORCH_CHECK_VALUE(block_out > 0 && block_in > 0, "block sizes must be positive, got ", block_out, " x ", block_in);
  TORCH_CHECK_VALUE(weight.dim() >= 2 && weight.size(0) % block_out == 0 && weight.size(1) % block_in == 0,
                    "block (", block_out, ", ", block_in, ") does not divide the weight of shape ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
                   weight.scalar_type());
  const int64_t matrix = weight.size(0) * weight.size(1);
  const int64_t rows = weight.size(0) / block_out, cols = weight.size(1) / block_in;
  TORCH_CHECK_VALUE(rows * cols < (int64_t{1} << 31), "block grid ", rows, " x ", cols, " is too large");
  return {rows, cols, matrix ? weight.numel() / matrix : 1};
}

TORCH_LIBRARY(sparse_kernels, m) {
  m.def("build_index(Tensor row_idx, Tensor col_idx, int num_rows, int num_cols) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prune_and_regrow(Tensor(a!)[] row_idx, Tensor(b!)[] col_idx, Tensor(c!)[] row_ptr, Tensor(d!)[] row_slots, "
      "Tensor(e!)[] col_ptr, Tensor(f!)[] col_slots, Tensor[] drop_scores, Tensor[] grow_scores, int[] num_rows, "
      "int[] num_cols, int[] k, Tensor(g!)[] zero_tensors, int[] zero_layer) -> Tensor");
  m.def("block_norms(Tensor weight, int block_out, int block_in) -> Tensor");
  m.def("build_info() -> str", &build_info);
  m.def("cpu_isa() -> str", &cpu::selected_isa);
  // Block-sparse linear and conv2d on CPU tensors, fp32 (cpu/linear.cpp, cpu/conv.cpp): the
  // kernels behind the sparse_kernels.bsr_linear / bsr_conv2d custom ops' CPU backend.
  m.def("bsr_linear_cpu(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor row_slots, Tensor col_idx) -> Tensor");
  m.def("bsr_linear_grad_input_cpu(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor col_slots, Tensor row_idx) -> Tensor");
  m.def(
      "bsr_linear_grad_weight_cpu(Tensor grad_out, Tensor x, Tensor row_idx, Tensor col_idx, Tensor col_slots, "
      "int block_out, int block_in) -> Tensor");
  m.def(
      "bsr_conv2d_cpu(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor row_slots, Tensor col_idx, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "bsr_conv2d_grad_input_cpu(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor col_slots, Tensor row_idx, "
      "int[2] input_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "bsr_conv2d_grad_weight_cpu(Tensor grad_out, Tensor x, Tensor row_idx, Tensor col_idx, Tensor col_slots, "
      "int[4] block_shape, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
}

}  // namespace sparse_kernels

// `import sparse_kernels._C` loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "compiled sparse_kernels ops", -1, nullptr};
  return PyModule_Create(&module);
}
