// CPU block-sparse linear, fp32: forward, grad-input and grad-weight (see driver.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "driver.h"

namespace sparse_kernels {
namespace cpu {
namespace {

struct Block {
  int64_t bo, bi;
};

Block check_values(const at::Tensor& values, const char* op) {
  check_float(values, op, "values", 3);
  check_block(op, values.size(1), values.size(2));
  return {values.size(1), values.size(2)};
}

// y = x @ W.T + bias: walks each output block-row's live blocks (row-sorted index).
at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                  const at::Tensor& row_ptr, const at::Tensor& row_slots, const at::Tensor& col_idx) {
  const char* op = "bsr_linear_cpu";
  const auto [bo, bi] = check_values(values, op);  // make_pairs checks the block count
  check_float(x, op, "x", 2);
  TORCH_CHECK_VALUE(x.size(1) % bi == 0, op, ": x of shape ", x.sizes(), " is not whole blocks of ", bi);
  const int64_t rows = row_ptr.numel() - 1, cols = x.size(1) / bi, out_features = rows * bo;
  const at::Tensor b = checked_bias(bias, op, out_features);
  const at::Tensor a = x.contiguous(), packed = values.transpose(1, 2).contiguous();  // [nnz][bi][bo]
  const PairTable table =
      make_pairs(op, row_ptr, row_slots, col_idx, cols, 1, 0, bi, bo, values, packed.data_ptr<float>());
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  const Isa& isa = select_isa();
  run_dsd(isa, DirectRows{a.data_ptr<float>(), a.size(1), a.size(0)}, a.size(0), a.size(1), table, bi, bo,
          b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

// dx = dy @ W: walks each input block-column's live blocks (column-sorted index).
at::Tensor linear_grad_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                             const at::Tensor& col_slots, const at::Tensor& row_idx) {
  const char* op = "bsr_linear_grad_input_cpu";
  const auto [bo, bi] = check_values(values, op);
  check_float(grad_out, op, "grad_out", 2);
  TORCH_CHECK_VALUE(grad_out.size(1) % bo == 0, op, ": grad_out of shape ", grad_out.sizes(),
                    " is not whole blocks of ", bo);
  const int64_t cols = col_ptr.numel() - 1, rows = grad_out.size(1) / bo;
  const at::Tensor a = grad_out.contiguous(), w = values.contiguous();  // [nnz][bo][bi]: k = bo, n = bi
  const PairTable table =
      make_pairs(op, col_ptr, col_slots, row_idx, rows, 1, 0, bo, bi, values, w.data_ptr<float>());
  at::Tensor dx = at::empty({a.size(0), cols * bi}, a.options());
  run_dsd(select_isa(), DirectRows{a.data_ptr<float>(), a.size(1), a.size(0)}, a.size(0), a.size(1), table, bo, bi,
          nullptr, dx.data_ptr<float>());
  return dx;
}

// dW = dy.T @ x at the live blocks: [nnz, bo, bi].
at::Tensor linear_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_idx,
                              const at::Tensor& col_idx, const at::Tensor& col_slots, int64_t bo, int64_t bi) {
  const char* op = "bsr_linear_grad_weight_cpu";
  check_block(op, bo, bi);
  check_float(grad_out, op, "grad_out", 2);
  check_float(x, op, "x", 2);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) % bo == 0 && x.size(1) % bi == 0, op,
                    ": grad_out ", grad_out.sizes(), " and x ", x.sizes(), " must have the same rows and whole blocks");
  const int64_t nnz = row_idx.numel();
  check_slots(op, row_idx, col_idx, col_slots, grad_out.size(1) / bo, x.size(1) / bi);
  const at::Tensor dy = grad_out.contiguous(), a = x.contiguous();
  at::Tensor dw = at::empty({nnz, bo, bi}, x.options());
  run_sdd(select_isa(), a.data_ptr<float>(), a.size(1), a.size(0), dy.data_ptr<float>(), dy.size(1),
          row_idx.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), col_slots.data_ptr<int32_t>(), nnz, bo, bi,
          dw.data_ptr<float>());
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("bsr_linear_cpu", &linear);
  m.impl("bsr_linear_grad_input_cpu", &linear_grad_input);
  m.impl("bsr_linear_grad_weight_cpu", &linear_grad_weight);
}

}  // namespace cpu
}  // namespace sparse_kernels
