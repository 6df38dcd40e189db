// The schemas of the compiled ops, declared once, and the argument checks their kernels share.
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

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return c10::toString(type);
  }
}

LayoutShape check_index(const char* op, const LayoutIndex& index, int64_t nnz, int64_t bo, int64_t bi,
                        c10::Device device) {
  TORCH_CHECK_VALUE(bo > 0 && bi > 0, op, ": block sides must be positive, got (", bo, ", ", bi, ")");
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&index.row_idx, "row_idx"},     {&index.col_idx, "col_idx"}, {&index.row_ptr, "row_ptr"},
      {&index.row_slots, "row_slots"}, {&index.col_ptr, "col_ptr"}, {&index.col_slots, "col_slots"}};
  for (const auto& [t, name] : vectors) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->dim() == 1 && t->is_contiguous(), op, ": ", name, " must be a contiguous vector, got shape ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " is on ", t->device(), " but the values on ", device);
  }
  for (const auto& [t, name] : {vectors[0], vectors[1], vectors[3], vectors[5]})
    TORCH_CHECK_VALUE(t->size(0) == nnz, op, ": ", name, " must have ", nnz, " entries (one per live block), got ",
                      t->size(0));
  TORCH_CHECK_VALUE(index.row_ptr.size(0) >= 1 && index.col_ptr.size(0) >= 1, op,
                    ": row_ptr and col_ptr must not be empty");
  return {nnz, index.row_ptr.size(0) - 1, index.col_ptr.size(0) - 1, bo, bi};
}

LayoutShape check_layout(const char* op, const at::Tensor& values, const LayoutIndex& index, int64_t taps) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), op, ": values must be floating point, got ",
                   dtype_name(values.scalar_type()));
  TORCH_CHECK_VALUE(values.dim() == 3 + taps, op, ": values must be [nnz, bo, bi", taps ? ", kh, kw" : "",
                    "], got shape ", values.sizes());
  return check_index(op, index, values.size(0), values.size(1), values.size(2), values.device());
}

void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                   const char* like_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", dtype_name(t.scalar_type()),
                   ", ", like_name, " ", dtype_name(like.scalar_type()), ": they must match");
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", ", like_name, " on ",
                    like.device(), ": they must match");
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t features, const at::Tensor& like) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == features, op, ": bias must have shape (", features,
                    ",), got ", bias->sizes());
  check_operand(op, "bias", *bias, like);
}

// The schemas of every op, in one place. Kernels: cpu/*.cpp (CPU), cuda/masks.cu (CUDA mask
// ops), autograd.cpp (Autograd and Autocast); the Triton kernels (CUDA) and the fake kernels
// are registered from Python, in one place (sparse_kernels/registry.py).
TORCH_LIBRARY(sparse_kernels, m) {
  m.def("build_index(Tensor row_idx, Tensor col_idx, int num_rows, int num_cols) -> (Tensor, Tensor, Tensor, Tensor)");
  // Per layer: drops the k live blocks with the smallest drop score, grows the k with the
  // largest grow score among the blocks inactive after the drop (regrow_dropped: dropped
  // ones included, which keep their slot; else among the blocks dead before), zeroes the
  // reused slots' rows of zero_tensors and rebuilds the index. -> int64 [layers], the net
  // number of blocks moved per layer.
  m.def(
      "prune_and_regrow(Tensor(a!)[] row_idx, Tensor(b!)[] col_idx, Tensor(c!)[] row_ptr, Tensor(d!)[] row_slots, "
      "Tensor(e!)[] col_ptr, Tensor(f!)[] col_slots, Tensor[] drop_scores, Tensor[] grow_scores, int[] num_rows, "
      "int[] num_cols, int[] k, Tensor(g!)[] zero_tensors, int[] zero_layer, bool regrow_dropped=True) -> Tensor");
  m.def("block_norms(Tensor weight, int block_out, int block_in) -> Tensor");
  m.def("build_info() -> str", &build_info);
  m.def("cpu_isa() -> str", &cpu::selected_isa);
  // Whether the compiled CPU kernels take (dtype, block_out x block_in); the rest runs on their
  // masked-dense reference path. Python's capability rule for the CPU asks this.
  m.def("cpu_kernels_take(ScalarType dtype, int block_out, int block_in) -> bool", &cpu::kernels_take);

  // y = x @ W.T + bias for x [..., in]; W [out, in] block-sparse (values [nnz, bo, bi]).
  m.def(
      "bsr_linear(Tensor x, Tensor values, Tensor? bias, Tensor row_idx, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_slots, Tensor col_ptr, Tensor col_slots) -> Tensor");
  // dx = dy @ W for grad_out [..., out].
  m.def(
      "bsr_linear_grad_input(Tensor grad_out, Tensor values, Tensor row_idx, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_slots, Tensor col_ptr, Tensor col_slots) -> Tensor");
  // dW = dy.T @ x at the live blocks: [nnz, block_out, block_in].
  m.def(
      "bsr_linear_grad_weight(Tensor grad_out, Tensor x, Tensor row_idx, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_slots, Tensor col_ptr, Tensor col_slots, SymInt block_out, SymInt block_in) -> Tensor");
  // y = conv2d(x, W) + bias for x [N, Cin, H, W]; W [Cout, Cin, kh, kw] block-sparse over channel
  // blocks (values [nnz, bo, bi, kh, kw]). y is channels-last when x is, or when channels_last
  // is set (as F.conv2d gives for a channels-last weight), and contiguous otherwise.
  m.def(
      "bsr_conv2d(Tensor x, Tensor values, Tensor? bias, Tensor row_idx, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_slots, Tensor col_ptr, Tensor col_slots, int[2] stride, int[2] padding, int[2] dilation, "
      "bool channels_last=False) -> Tensor");
  // dx of the convolution, [N, Cin, *input_size], stored like grad_out.
  m.def(
      "bsr_conv2d_grad_input(Tensor grad_out, Tensor values, Tensor row_idx, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_slots, Tensor col_ptr, Tensor col_slots, SymInt[2] input_size, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  // The weight gradient at the live blocks: [nnz, bo, bi, kh, kw] for block_shape (bo, bi, kh, kw).
  m.def(
      "bsr_conv2d_grad_weight(Tensor grad_out, Tensor x, Tensor row_idx, Tensor col_idx, Tensor row_ptr, "
      "Tensor row_slots, Tensor col_ptr, Tensor col_slots, SymInt[4] block_shape, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");

  // y = silu(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps)) for x [N, C, H, W]
  // (fp32 on the CPU) and an optional shift [N, C] (a time embedding), stored like x;
  // differentiable (autograd.cpp). _forward also returns mean and rstd [N, groups] (of x + shift);
  // _backward returns the gradients of x, weight, bias and shift (empty [0] without a shift).
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, int groups, float eps, Tensor? shift=None) -> Tensor");
  m.def(
      "group_norm_silu_forward(Tensor x, Tensor weight, Tensor bias, int groups, float eps, Tensor? shift=None) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, "
      "int groups, Tensor? shift=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace sparse_kernels

// `import sparse_kernels._C` loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "compiled sparse_kernels ops", -1, nullptr};
  return PyModule_Create(&module);
}
