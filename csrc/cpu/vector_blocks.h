// The products of vector blocks (bo output channels x 1 input channel, x every tap) that the
// square blocks' drivers do not cover. The forward is the square blocks' dsd with pairs one input
// channel deep (driver.h: k = 1); what differs is
//   grad-input: a block feeds one input channel, so there is no vector of outputs to broadcast
//     into. It runs channel-major instead: dy is copied into planes (each channel's pixels in
//     rows, zero-padded so that every tap of every output pixel reads inside), a band of an
//     image at a time into a thread's buffer, and a tile of kTileWidth consecutive positions of
//     every input channel sums, output block by output block, the block's taps and bo planes
//     times the weights of the channels it feeds: a small dense product (channels x bo * taps)
//     @ (bo * taps x positions) whose plane vectors are each loaded once for several channels
//     (isa.h: BlockTile); the tile is then transposed into dx. A stride s splits dx into s x s
//     phases, each a stride-1 product over the planes with the taps that reach it.
//   grad-weight: items (slot, tap) of one output block and one tap share its dy rows: every
//     row's bo-vector of dy is multiplied by one broadcast input per item, channels of one pixel
//     of x (isa.h: SddVectorTile), over the output pixels in chunks that stay in L1, in runs
//     clipped to where the tap reads inside x.
// A linear layer is the 1 x 1 convolution of one image row of `rows` pixels.
#pragma once

#include <ATen/core/Tensor.h>

#include "driver.h"

namespace sparse_kernels {
namespace cpu {

// A convolution as the vector kernels see it: x [batch, in_h, in_w, cin] -> y [batch, out_h, out_w, cout].
struct ConvShape {
  int64_t batch, in_h, in_w, out_h, out_w, kh, kw;
  int64_t stride[2], padding[2], dilation[2];
  int64_t taps() const { return kh * kw; }
  // The linear layer over `rows` rows.
  static ConvShape linear(int64_t rows) { return {1, 1, rows, 1, rows, 1, 1, {1, 1}, {0, 0}, {1, 1}}; }
};

// Element (n, c, y, x) of a 4-d float tensor at data + n * n_step + c * c_step + y * y_step + x * x_step.
struct Strided {
  float* data;
  int64_t n_step, c_step, y_step, x_step;
  static Strided of(const at::Tensor& t) {  // t [N, C, H, W], any strides
    return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  }
  static Strided rows(float* data, int64_t features) { return {data, 0, 1, 0, features}; }  // [rows, features]
};

// dx = grad-input of vector blocks: dy [batch, cout, out_h, out_w] (fp32, any strides), the
// column-sorted index (col_ptr, col_slots) and the slots' row_idx; weights packed [nnz][taps][bo].
// Writes every element of dx [batch, cin, in_h, in_w].
void vector_grad_input(const char* op, const Isa& isa, const Strided& dy, const float* packed,
                       const at::Tensor& row_idx, const at::Tensor& col_ptr, const at::Tensor& col_slots,
                       const LayoutShape& layout, const ConvShape& conv, const Strided& dx);

// acc [nnz][taps][bo] = grad-weight of vector blocks at the live slots: dy NHWC [batch, out_h,
// out_w, cout] with its pixels dy_stride >= cout floats apart (a channel slice read in place) and
// x NHWC [batch, in_h, in_w, cin] contiguous, fp32; the row-sorted index (row_ptr, row_slots;
// row_slots checked by the caller: check_slots) and the slots' col_idx.
void vector_grad_weight(const char* op, const Isa& isa, const float* dy, int64_t dy_stride, const float* x,
                        const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                        const LayoutShape& layout, const ConvShape& conv, float* acc);

}  // namespace cpu
}  // namespace sparse_kernels
