// The CPU kernels of the block-sparse linear ops: forward, grad-input and grad-weight (see
// driver.h). fp16 and bf16 operands are widened to fp32 on the way in and the result rounded
// once on the way out; what the kernels cannot take runs on the masked-dense path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "driver.h"
#include "vector_blocks.h"

namespace sparse_kernels {
namespace cpu {
namespace {

// The rows of [..., features] as a contiguous fp32 [rows, features] matrix.
at::Tensor float_rows(const at::Tensor& t, int64_t features) { return as_float(t).reshape({-1, features}).contiguous(); }

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape = t.sizes().vec();
  shape.back() = last;
  return shape;
}

void check_features(const char* op, const char* name, const at::Tensor& t, int64_t features) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == features, op, ": ", name, " must have shape [..., ", features,
                    "], got ", t.sizes());
}

// y = x @ W.T + bias: walks each output block-row's live blocks (row-sorted index).
at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                  const at::Tensor& row_idx, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                  const at::Tensor& row_slots, const at::Tensor& col_ptr, const at::Tensor& col_slots) {
  const char* op = "bsr_linear";
  const LayoutShape L = check_layout(op, values, {row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots}, 0);
  check_operand(op, "x", x, values);
  const int64_t in = L.cols * L.bi, out = L.rows * L.bo;
  check_features(op, "x", x, in);
  check_bias(op, bias, out, values);
  if (!kernels_take(values.scalar_type(), L.bo, L.bi))
    return at::linear(x, dense_weight(values, L, row_idx, col_idx), bias);
  const at::Tensor a = float_rows(x, in);
  const float* packed = pack_weights(as_float(values), true);  // [nnz][bi][bo]
  const PairTable table =
      make_pairs(op, row_ptr, row_slots, col_idx, L.cols, PanelLayout::per_tap(1), L.bi, L.bo, packed);
  const at::Tensor b = bias ? as_float(*bias).contiguous() : at::Tensor();
  at::Tensor y = at::empty({a.size(0), out}, a.options());
  run_dsd(select_isa(), DirectTiles{a.data_ptr<float>(), in, a.size(0)}, table, L.bo,
          b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y.view(with_last(x, out)).to(x.scalar_type());
}

// dx = dy @ W: walks each input block-column's live blocks (column-sorted index).
at::Tensor linear_grad_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& row_idx,
                             const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                             const at::Tensor& col_ptr, const at::Tensor& col_slots) {
  const char* op = "bsr_linear_grad_input";
  const LayoutShape L = check_layout(op, values, {row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots}, 0);
  check_operand(op, "grad_out", grad_out, values);
  const int64_t in = L.cols * L.bi, out = L.rows * L.bo;
  check_features(op, "grad_out", grad_out, out);
  if (!kernels_take(values.scalar_type(), L.bo, L.bi))
    return at::matmul(grad_out, dense_weight(values, L, row_idx, col_idx));
  const at::Tensor a = float_rows(grad_out, out), w = as_float(values).contiguous();  // [nnz][bo][bi]: k = bo, n = bi
  if (L.bi == 1) {  // vector blocks: channel-major (vector_blocks.h)
    at::Tensor dx = at::empty({a.size(0), in}, a.options());
    vector_grad_input(op, select_isa(), Strided::rows(a.data_ptr<float>(), out), w.data_ptr<float>(), row_idx,
                      col_ptr, col_slots, L, ConvShape::linear(a.size(0)), Strided::rows(dx.data_ptr<float>(), in));
    return dx.view(with_last(grad_out, in)).to(grad_out.scalar_type());
  }
  const PairTable table = make_pairs(op, col_ptr, col_slots, row_idx, L.rows, PanelLayout::per_tap(1), L.bo, L.bi,
                                     w.data_ptr<float>());
  at::Tensor dx = at::empty({a.size(0), in}, a.options());
  run_dsd(select_isa(), DirectTiles{a.data_ptr<float>(), out, a.size(0)}, table, L.bi, nullptr, dx.data_ptr<float>());
  return dx.view(with_last(grad_out, in)).to(grad_out.scalar_type());
}

// dW = dy.T @ x at the live blocks: [nnz, bo, bi].
at::Tensor linear_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_idx,
                              const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                              const at::Tensor& col_ptr, const at::Tensor& col_slots, int64_t bo, int64_t bi) {
  const char* op = "bsr_linear_grad_weight";
  const LayoutIndex index{row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots};
  const LayoutShape L = check_index(op, index, row_idx.size(0), bo, bi, x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                   dtype_name(x.scalar_type()));
  check_operand(op, "grad_out", grad_out, x, "x");
  const int64_t in = L.cols * bi, out = L.rows * bo;
  check_features(op, "x", x, in);
  check_features(op, "grad_out", grad_out, out);
  TORCH_CHECK_VALUE(grad_out.numel() / out == x.numel() / in, op, ": grad_out ", grad_out.sizes(), " and x ",
                    x.sizes(), " must have the same rows");
  if (!kernels_take(x.scalar_type(), bo, bi))
    return live_blocks(grad_out.reshape({-1, out}).t().matmul(x.reshape({-1, in})), L, row_idx, col_idx);
  const at::Tensor dy = float_rows(grad_out, out), a = float_rows(x, in);
  check_slots(op, row_idx, col_idx, bi == 1 ? row_slots : col_slots, L.rows, L.cols);
  at::Tensor dw = at::empty({L.nnz, bo, bi}, a.options());
  if (bi == 1) {  // vector blocks (vector_blocks.h)
    vector_grad_weight(op, select_isa(), dy.data_ptr<float>(), out, a.data_ptr<float>(), col_idx, row_ptr, row_slots,
                       L, ConvShape::linear(a.size(0)), dw.data_ptr<float>());
    return dw.to(x.scalar_type());
  }
  static thread_local SddPlan plan;  // chunks of 128 rows: a chunk of dy and x stays in cache across the slots
  plan.reset(1);
  for (int64_t m0 = 0; m0 < a.size(0); m0 += 128, ++plan.chunks) {
    plan.add(m0 * out, m0 * in, std::min<int64_t>(128, a.size(0) - m0), out, in);
    plan.close();
  }
  run_sdd(select_isa(), dy.data_ptr<float>(), out, a.data_ptr<float>(), in, plan, row_idx.data_ptr<int32_t>(),
          col_idx.data_ptr<int32_t>(), col_slots.data_ptr<int32_t>(), L.nnz, bo, bi, dw.data_ptr<float>());
  return dw.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("bsr_linear", &linear);
  m.impl("bsr_linear_grad_input", &linear_grad_input);
  m.impl("bsr_linear_grad_weight", &linear_grad_weight);
}

}  // namespace cpu
}  // namespace sparse_kernels
