// The Autograd and Autocast kernels of the differentiable ops, bsr_linear and bsr_conv2d, and the
// Autograd kernel of group_norm_silu.
//
// Both run for every device: they call the ops again through the dispatcher (which then
// picks the device kernel: C++ on CPU, Triton on CUDA) and build the backward from the
// grad-input and grad-weight ops the same way. Nothing here runs Python, so a layer's
// forward and backward cost one dispatcher call each besides the kernels.
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <numeric>
#include <optional>

#include "ops.h"

namespace sparse_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Index = const at::Tensor&;

// Typed handles of the ops, looked up once.
template <class Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, Index, Index,
                                   Index, Index, Index, Index);
using LinearGradInputSignature = at::Tensor(const at::Tensor&, const at::Tensor&, Index, Index, Index, Index, Index,
                                            Index);
using LinearGradWeightSignature = at::Tensor(const at::Tensor&, const at::Tensor&, Index, Index, Index, Index, Index,
                                             Index, c10::SymInt, c10::SymInt);
using Conv2dSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, Index, Index,
                                 Index, Index, Index, Index, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                 bool);
using Conv2dGradSignature = at::Tensor(const at::Tensor&, const at::Tensor&, Index, Index, Index, Index, Index, Index,
                                     c10::SymIntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef);

const auto& linear_op() {
  static const auto op = handle<LinearSignature>("sparse_kernels::bsr_linear");
  return op;
}
const auto& linear_grad_input_op() {
  static const auto op = handle<LinearGradInputSignature>("sparse_kernels::bsr_linear_grad_input");
  return op;
}
const auto& linear_grad_weight_op() {
  static const auto op = handle<LinearGradWeightSignature>("sparse_kernels::bsr_linear_grad_weight");
  return op;
}
const auto& conv2d_op() {
  static const auto op = handle<Conv2dSignature>("sparse_kernels::bsr_conv2d");
  return op;
}
const auto& conv2d_grad_input_op() {
  static const auto op = handle<Conv2dGradSignature>("sparse_kernels::bsr_conv2d_grad_input");
  return op;
}
const auto& conv2d_grad_weight_op() {
  static const auto op = handle<Conv2dGradSignature>("sparse_kernels::bsr_conv2d_grad_weight");
  return op;
}

// The bias gradient: grad_out summed over `dims`, accumulated in at least fp32 as the kernels do.
at::Tensor bias_grad(const at::Tensor& grad_out, at::IntArrayRef dims) {
  return grad_out.sum(dims, false, at::promote_types(grad_out.scalar_type(), at::kFloat)).to(grad_out.scalar_type());
}

// The six index tensors, saved after x and values.
constexpr size_t kIndex = 2;

class Linear : public torch::autograd::Function<Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const std::optional<at::Tensor>& bias, Index row_idx, Index col_idx, Index row_ptr,
                            Index row_slots, Index col_ptr, Index col_slots) {
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({x, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_op().call(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &grad_out = grads[0];
    const at::Tensor* index = saved.data() + kIndex;
    variable_list result(3 + 6);
    if (ctx->needs_input_grad(0))
      result[0] = linear_grad_input_op().call(grad_out, values, index[0], index[1], index[2], index[3], index[4],
                                              index[5]);
    if (ctx->needs_input_grad(1))
      result[1] = linear_grad_weight_op().call(grad_out, x, index[0], index[1], index[2], index[3], index[4], index[5],
                                               values.sym_size(1), values.sym_size(2));
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      std::vector<int64_t> leading(grad_out.dim() - 1);
      std::iota(leading.begin(), leading.end(), 0);
      result[2] = leading.empty() ? grad_out : bias_grad(grad_out, leading);
    }
    return result;
  }
};

class Conv2d : public torch::autograd::Function<Conv2d> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const std::optional<at::Tensor>& bias, Index row_idx, Index col_idx, Index row_ptr,
                            Index row_slots, Index col_ptr, Index col_slots, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, bool channels_last) {
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->save_for_backward({x, values, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_op().call(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, stride, padding,
                          dilation, channels_last);
  }

  // grad_out arrives strided like y; grad-input gives dx in grad_out's memory format. A channel
  // slice of a channels-last gradient (the backward of torch.cat in a UNet's up blocks) goes to
  // the kernels as it is: the CPU ones read its pixels in place.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1];
    const at::Tensor& grad_out = grads[0];
    const at::Tensor* index = saved.data() + kIndex;
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    variable_list result(3 + 6 + 4);
    if (ctx->needs_input_grad(0))
      result[0] = conv2d_grad_input_op().call(grad_out, values, index[0], index[1], index[2], index[3], index[4],
                                            index[5], x.sym_sizes().slice(2), stride, padding, dilation);
    if (ctx->needs_input_grad(1))
      result[1] = conv2d_grad_weight_op().call(grad_out, x, index[0], index[1], index[2], index[3], index[4], index[5],
                                             values.sym_sizes().slice(1), stride, padding, dilation);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) result[2] = bias_grad(grad_out, {0, 2, 3});
    return result;
  }
};

using NormForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, const std::optional<at::Tensor>&);
using NormBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, const std::optional<at::Tensor>&);

class GroupNormSiLU : public torch::autograd::Function<GroupNormSiLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t groups, double eps,
                            const std::optional<at::Tensor>& shift) {
    static const auto op = handle<NormForwardSignature>("sparse_kernels::group_norm_silu_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = op.call(x, weight, bias, groups, eps, shift);
    ctx->saved_data["groups"] = groups;
    ctx->save_for_backward({x, weight, bias, mean, rstd, shift.value_or(at::Tensor())});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<NormBackwardSignature>("sparse_kernels::group_norm_silu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> shift = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    auto [dx, dweight, dbias, dshift] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                                ctx->saved_data["groups"].toInt(), shift);
    // one gradient per argument; needs_input_grad counts the tensor arguments only (shift is the 4th)
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), ctx->needs_input_grad(1) ? dweight : at::Tensor(),
            ctx->needs_input_grad(2) ? dbias : at::Tensor(), at::Tensor(), at::Tensor(),
            shift && ctx->needs_input_grad(3) ? dshift : at::Tensor()};
  }
};

at::Tensor group_norm_silu_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    int64_t groups, double eps, const std::optional<at::Tensor>& shift) {
  return GroupNormSiLU::apply(x, weight, bias, groups, eps, shift);
}

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                           Index row_idx, Index col_idx, Index row_ptr, Index row_slots, Index col_ptr,
                           Index col_slots) {
  return Linear::apply(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots);
}

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                         Index row_idx, Index col_idx, Index row_ptr, Index row_slots, Index col_ptr, Index col_slots,
                         c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                         bool channels_last) {
  return Conv2d::apply(x, values, bias, row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots, stride, padding,
                       dilation, channels_last);
}

// Under torch.autocast the floating operands run in its dtype, as torch's own linear and
// convolution do; the casts are differentiable, so fp32 values get fp32 gradients.
template <c10::DeviceType device>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                           Index row_idx, Index col_idx, Index row_ptr, Index row_slots, Index col_ptr,
                           Index col_slots) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return linear_op().call(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(dtype, values, device),
                          at::autocast::cached_cast(dtype, bias, device), row_idx, col_idx, row_ptr, row_slots,
                          col_ptr, col_slots);
}

template <c10::DeviceType device>
at::Tensor conv2d_autocast(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                         Index row_idx, Index col_idx, Index row_ptr, Index row_slots, Index col_ptr, Index col_slots,
                         c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                         bool channels_last) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return conv2d_op().call(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(dtype, values, device),
                        at::autocast::cached_cast(dtype, bias, device), row_idx, col_idx, row_ptr, row_slots, col_ptr,
                        col_slots, stride, padding, dilation, channels_last);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, Autograd, m) {
  m.impl("bsr_linear", &linear_autograd);
  m.impl("bsr_conv2d", &conv2d_autograd);
  m.impl("group_norm_silu", &group_norm_silu_autograd);
}

TORCH_LIBRARY_IMPL(sparse_kernels, AutocastCPU, m) {
  m.impl("bsr_linear", &linear_autocast<c10::DeviceType::CPU>);
  m.impl("bsr_conv2d", &conv2d_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(sparse_kernels, AutocastCUDA, m) {
  m.impl("bsr_linear", &linear_autocast<c10::DeviceType::CUDA>);
  m.impl("bsr_conv2d", &conv2d_autocast<c10::DeviceType::CUDA>);
}

}  // namespace sparse_kernels
