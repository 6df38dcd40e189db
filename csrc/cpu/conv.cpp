// CPU block-sparse conv2d, fp32: forward, grad-input and grad-weight as implicit GEMMs over
// gathered im2col tiles (see driver.h). They compute channels-last; results come back in the
// memory format of the input, as F.conv2d's do.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "driver.h"

namespace sparse_kernels {
namespace cpu {
namespace {

struct Conv {
  int64_t stride[2], padding[2], dilation[2];
};

Conv check_conv(const char* op, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must be pairs");
  Conv c{};
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0, op, ": stride ", stride, ", padding ",
                      padding, " and dilation ", dilation, " must be positive (padding non-negative)");
    c.stride[d] = stride[d], c.padding[d] = padding[d], c.dilation[d] = dilation[d];
  }
  return c;
}

// As F.conv2d computes it; 0 where the dilated kernel does not fit the padded input.
int64_t output_size(int64_t size, int64_t kernel, const Conv& c, int d) {
  const int64_t span = size + 2 * c.padding[d] - c.dilation[d] * (kernel - 1) - 1;
  return span < 0 ? 0 : span / c.stride[d] + 1;
}

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// out[n][q][p] = in[n][p][q] for contiguous [n][p][q] blocks, 32 x 32 tiles at a time through a
// local buffer, so that both sides are read and written along rows (torch's strided copy of
// this permutation runs at a few GB/s: rows 4 KB apart share one L1 set).
void transpose_batched(const float* in, float* out, int64_t batch, int64_t p, int64_t q) {
  constexpr int64_t T = 32;
  const int64_t tp = (p + T - 1) / T, tq = (q + T - 1) / T;
  at::parallel_for(0, batch * tp * tq, 16, [&](int64_t begin, int64_t end) {
    float tile[T][T];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (tp * tq), p0 = t / tq % tp * T, q0 = t % tq * T;
      const int64_t np = std::min(T, p - p0), nq = std::min(T, q - q0);
      const float* src = in + n * p * q + p0 * q + q0;
      float* dst = out + n * p * q + q0 * p + p0;
      for (int64_t i = 0; i < np; ++i)
        for (int64_t j = 0; j < nq; ++j) tile[j][i] = src[i * q + j];
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t i = 0; i < np; ++i) dst[j * p + i] = tile[j][i];
    }
  });
}

// The NHWC [N, H, W, C] contiguous form of an NCHW tensor: a view when it is stored so.
at::Tensor channels_last(const at::Tensor& t) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t.permute({0, 2, 3, 1});
  const at::Tensor c = t.contiguous();
  at::Tensor out = at::empty({t.size(0), t.size(2), t.size(3), t.size(1)}, t.options());
  transpose_batched(c.data_ptr<float>(), out.data_ptr<float>(), t.size(0), t.size(1), t.size(2) * t.size(3));
  return out;
}

// An NHWC result as an NCHW tensor stored like `like` (F.conv2d's rule): channels-last as
// computed, else copied into contiguous NCHW.
at::Tensor stored_like(const at::Tensor& nhwc, const at::Tensor& like) {
  if (is_channels_last(like)) return nhwc.permute({0, 3, 1, 2});
  at::Tensor out = at::empty({nhwc.size(0), nhwc.size(3), nhwc.size(1), nhwc.size(2)}, nhwc.options());
  transpose_batched(nhwc.data_ptr<float>(), out.data_ptr<float>(), nhwc.size(0), nhwc.size(1) * nhwc.size(2),
                    nhwc.size(3));
  return out;
}

GatherRows gather(const at::Tensor& src_nhwc, int64_t dst_h, int64_t dst_w, int64_t kh, int64_t kw, const Conv& c,
                  bool transposed) {
  return {src_nhwc.data_ptr<float>(), src_nhwc.size(3), src_nhwc.size(1), src_nhwc.size(2), dst_h, dst_w, kh, kw,
          {c.stride[0], c.stride[1]}, {c.padding[0], c.padding[1]}, {c.dilation[0], c.dilation[1]}, transposed};
}

void check_values5(const at::Tensor& values, const char* op) {
  check_float(values, op, "values", 5);
  check_block(op, values.size(1), values.size(2));
  TORCH_CHECK_VALUE(values.size(3) > 0 && values.size(4) > 0, op, ": values of shape ", values.sizes(),
                    " have an empty kernel");
}

// y = conv2d(x, W) + bias: each tile of output pixels gathers its im2col rows once and
// walks every output block's live (block, tap) pairs.
at::Tensor conv(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                const at::Tensor& row_ptr, const at::Tensor& row_slots, const at::Tensor& col_idx,
                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "bsr_conv2d_cpu";
  check_values5(values, op);
  check_float(x, op, "x", 4);
  const Conv c = check_conv(op, stride, padding, dilation);
  const int64_t bo = values.size(1), bi = values.size(2), kh = values.size(3), kw = values.size(4);
  TORCH_CHECK_VALUE(x.size(1) % bi == 0, op, ": x of shape ", x.sizes(), " is not whole channel blocks of ", bi);
  const int64_t rows = row_ptr.numel() - 1, cols = x.size(1) / bi, out_channels = rows * bo;
  const int64_t oh = output_size(x.size(2), kh, c, 0), ow = output_size(x.size(3), kw, c, 1);
  TORCH_CHECK_VALUE(oh > 0 && ow > 0, op, ": input ", x.sizes(), " is smaller than the dilated kernel");
  const at::Tensor b = checked_bias(bias, op, out_channels);
  const at::Tensor src = channels_last(x);
  const at::Tensor packed = values.permute({0, 3, 4, 2, 1}).contiguous();  // [nnz][kh][kw][bi][bo]
  const PairTable table =
      make_pairs(op, row_ptr, row_slots, col_idx, cols, kh * kw, x.size(1), bi, bo, values,
                 packed.data_ptr<float>());
  at::Tensor y = at::empty({x.size(0), oh, ow, out_channels}, x.options());
  const GatherRows rows_of = gather(src, oh, ow, kh, kw, c, false);
  run_dsd(select_isa(), rows_of, x.size(0) * oh * ow, rows_of.lda(), table, bi, bo,
          b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return stored_like(y, x);
}

// dx = conv_transpose2d(dy, W): each tile of input pixels gathers the output pixels that
// each tap maps onto it (none where the stride skips it) and walks each input block's live pairs.
at::Tensor conv_grad_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                           const at::Tensor& col_slots, const at::Tensor& row_idx, c10::IntArrayRef input_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "bsr_conv2d_grad_input_cpu";
  check_values5(values, op);
  check_float(grad_out, op, "grad_out", 4);
  const Conv c = check_conv(op, stride, padding, dilation);
  TORCH_CHECK_VALUE(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0, op,
                    ": input_size must be a positive pair, got ", input_size);
  const int64_t bo = values.size(1), bi = values.size(2), kh = values.size(3), kw = values.size(4);
  const int64_t h = input_size[0], w = input_size[1];
  TORCH_CHECK_VALUE(grad_out.size(1) % bo == 0 && grad_out.size(2) == output_size(h, kh, c, 0) &&
                        grad_out.size(3) == output_size(w, kw, c, 1),
                    op, ": grad_out of shape ", grad_out.sizes(), " does not fit input size ", input_size);
  const int64_t cols = col_ptr.numel() - 1, rows = grad_out.size(1) / bo;
  const at::Tensor src = channels_last(grad_out);
  const at::Tensor packed = values.permute({0, 3, 4, 1, 2}).contiguous();  // [nnz][kh][kw][bo][bi]
  const PairTable table =
      make_pairs(op, col_ptr, col_slots, row_idx, rows, kh * kw, grad_out.size(1), bo, bi, values,
                 packed.data_ptr<float>());
  at::Tensor dx = at::empty({grad_out.size(0), h, w, cols * bi}, grad_out.options());
  const GatherRows rows_of = gather(src, h, w, kh, kw, c, true);
  run_dsd(select_isa(), rows_of, grad_out.size(0) * h * w, rows_of.lda(), table, bo, bi, nullptr,
          dx.data_ptr<float>());
  return stored_like(dx, grad_out);
}

// Output columns [lo, hi) whose tap j reads an input column inside the image, on axis d.
std::pair<int64_t, int64_t> valid_range(int64_t out, int64_t in, int64_t j, const Conv& c, int d) {
  const int64_t shift = j * c.dilation[d] - c.padding[d];  // input column of output column x: x * s + shift
  const int64_t lo = shift >= 0 ? 0 : (-shift + c.stride[d] - 1) / c.stride[d];
  const int64_t last = in - 1 - shift;  // x * s <= last
  const int64_t hi = last < 0 ? 0 : std::min(out, last / c.stride[d] + 1);
  return {lo, std::max(lo, hi)};
}

// dW at the live blocks, [nnz, bo, bi, kh, kw]: a reduction over every output pixel. Each
// (slot, tap) reads, for every output row, the run of input pixels its tap sees in place
// (no im2col copy); chunks of output rows keep the data they share in cache, and the
// threads split a chunk's (slot, tap) items (column-sorted: neighbours read the same input).
at::Tensor conv_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_idx,
                            const at::Tensor& col_idx, const at::Tensor& col_slots, c10::IntArrayRef block_shape,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "bsr_conv2d_grad_weight_cpu";
  TORCH_CHECK_VALUE(block_shape.size() == 4 && block_shape[2] > 0 && block_shape[3] > 0, op,
                    ": block_shape must be [bo, bi, kh, kw], got ", block_shape);
  const int64_t bo = block_shape[0], bi = block_shape[1], kh = block_shape[2], kw = block_shape[3];
  check_block(op, bo, bi);
  check_float(grad_out, op, "grad_out", 4);
  check_float(x, op, "x", 4);
  const Conv c = check_conv(op, stride, padding, dilation);
  const int64_t oh = output_size(x.size(2), kh, c, 0), ow = output_size(x.size(3), kw, c, 1);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) % bo == 0 && x.size(1) % bi == 0 &&
                        grad_out.size(2) == oh && grad_out.size(3) == ow,
                    op, ": grad_out ", grad_out.sizes(), " does not fit x ", x.sizes(), " and the convolution");
  const int64_t nnz = row_idx.numel(), taps = kh * kw;
  check_slots(op, row_idx, col_idx, col_slots, grad_out.size(1) / bo, x.size(1) / bi);
  const at::Tensor dy = channels_last(grad_out), src = channels_last(x);
  at::Tensor acc = at::zeros({nnz, kh, kw, bo, bi}, x.options());
  const int64_t h = x.size(2), w = x.size(3), cin = x.size(1), cout = grad_out.size(1);
  const float *dy_data = dy.data_ptr<float>(), *x_data = src.data_ptr<float>();
  float* acc_data = acc.data_ptr<float>();
  const int32_t *rows = row_idx.data_ptr<int32_t>(), *cols = col_idx.data_ptr<int32_t>();
  const int32_t* order = col_slots.data_ptr<int32_t>();
  const Isa& isa = select_isa();
  const int64_t out_rows = x.size(0) * oh, chunk = std::max<int64_t>(1, 256 / ow);
  for (int64_t r0 = 0; r0 < out_rows; r0 += chunk) {
    const int64_t r1 = std::min(out_rows, r0 + chunk);
    at::parallel_for(0, nnz * taps, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t slot = order[item / taps], tap = item % taps, i = tap / kw, j = tap % kw;
        const auto [lo, hi] = valid_range(ow, w, j, c, 1);
        if (lo == hi) continue;
        const int64_t sx = lo * c.stride[1] + j * c.dilation[1] - c.padding[1];
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t n = row / oh, sy = row % oh * c.stride[0] + i * c.dilation[0] - c.padding[0];
          if (sy < 0 || sy >= h) continue;
          isa.sdd({dy_data + (row * ow + lo) * cout + rows[slot] * bo, cout,
                   x_data + ((n * h + sy) * w + sx) * cin + cols[slot] * bi, c.stride[1] * cin, hi - lo, bo, bi,
                   acc_data + (slot * taps + tap) * bo * bi});
        }
      }
    });
  }
  return acc.permute({0, 3, 4, 1, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("bsr_conv2d_cpu", &conv);
  m.impl("bsr_conv2d_grad_input_cpu", &conv_grad_input);
  m.impl("bsr_conv2d_grad_weight_cpu", &conv_grad_weight);
}

}  // namespace cpu
}  // namespace sparse_kernels
