// The CPU kernels of the block-sparse conv2d ops: forward, grad-input and grad-weight as
// implicit GEMMs over gathered im2col panels (see driver.h), computed channels-last in fp32.
// Results come back channels-last when the input is (or the forward is asked for it), else as
// contiguous NCHW; what the kernels cannot take runs on the masked-dense path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "driver.h"
#include "vector_blocks.h"

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

// Channels-last as torch sees it (strides ordered N, H, W, C; a channel slice of a
// channels-last tensor counts), and not also plainly contiguous.
bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast && !t.is_contiguous();
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

// The NHWC [N, H, W, C] contiguous form of an NCHW tensor: a view when it is stored so, a
// row copy when it is a channels-last view (a channel slice, as the backward of torch.cat gives).
at::Tensor channels_last(const at::Tensor& t) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast) || is_channels_last(t))
    return t.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1});
  const at::Tensor c = t.contiguous();
  at::Tensor out = at::empty({t.size(0), t.size(2), t.size(3), t.size(1)}, t.options());
  transpose_batched(c.data_ptr<float>(), out.data_ptr<float>(), t.size(0), t.size(1), t.size(2) * t.size(3));
  return out;
}

// The floats from one pixel to the next in an NHWC view whose pixels are evenly spaced (as
// channels_last and pixel_rows give them), read off an axis longer than 1: a stride along an
// axis of one element means nothing.
int64_t pixel_stride(const at::Tensor& nhwc) {
  int64_t pixels = 1;  // pixels per step along axis d
  for (int d = 2; d >= 0; pixels *= nhwc.size(d--))
    if (nhwc.size(d) > 1) return nhwc.stride(d) / pixels;
  return nhwc.size(3);
}

// The NHWC [N, H, W, C] view of a channels-last tensor or of a channel slice of one (the backward
// of torch.cat gives those): pixels evenly spaced, pixel_stride >= C floats apart, read in place;
// anything else as channels_last gives it.
at::Tensor pixel_rows(const at::Tensor& t) {
  const at::Tensor nhwc = t.permute({0, 2, 3, 1});
  const int64_t step = pixel_stride(nhwc), w = nhwc.size(2), hw = nhwc.size(1) * w;
  const auto spaced = [&](int d, int64_t stride) { return nhwc.size(d) == 1 || nhwc.stride(d) == stride; };
  const bool rows = spaced(3, 1) && step >= nhwc.size(3) && spaced(2, step) && spaced(1, w * step) &&
                    spaced(0, hw * step);
  return rows ? nhwc : channels_last(t);
}

// An NHWC result as an NCHW tensor in `dtype`: channels-last as computed, or copied into
// contiguous NCHW.
at::Tensor finish(const at::Tensor& nhwc, bool channels_last_out, at::ScalarType dtype) {
  if (channels_last_out) return nhwc.permute({0, 3, 1, 2}).to(dtype);
  at::Tensor out = at::empty({nhwc.size(0), nhwc.size(3), nhwc.size(1), nhwc.size(2)}, nhwc.options());
  transpose_batched(nhwc.data_ptr<float>(), out.data_ptr<float>(), nhwc.size(0), nhwc.size(1) * nhwc.size(2),
                    nhwc.size(3));
  return out.to(dtype);
}

// The source coordinate of each destination coordinate y < dst and tap i < kernel on axis d, or
// -1 outside the source: y * s - p + i * d (forward); for grad-input, the transposed map
// (y + p - i * d) / s where the stride divides it.
std::vector<int64_t> source_map(int64_t dst, int64_t kernel, int64_t src, const Conv& c, int d, bool transposed) {
  std::vector<int64_t> map(dst * kernel);
  for (int64_t y = 0; y < dst; ++y)
    for (int64_t i = 0; i < kernel; ++i) {
      int64_t s = y * c.stride[d] - c.padding[d] + i * c.dilation[d];
      if (transposed) {
        const int64_t t = y + c.padding[d] - i * c.dilation[d];
        s = t >= 0 && t % c.stride[d] == 0 ? t / c.stride[d] : -1;
      }
      map[y * kernel + i] = s >= 0 && s < src ? s : -1;
    }
  return map;
}

// Runs `dsd(tiles)` over the implicit im2col rows of `src` (NHWC) for the destination pixels
// [batch, dst_h, dst_w]: stride-1 widths in segments of image rows (SegmentTiles), the rest
// with every tap gathered (GatherTiles). Rows narrower than half a panel gather too: their
// short register tiles would cost more than the packing they save.
template <class Dsd>
void with_tiles(const at::Tensor& src, int64_t batch, int64_t dst_h, int64_t dst_w, int64_t kh, int64_t kw,
                const Conv& c, bool transposed, Dsd&& dsd) {
  const int64_t h = src.size(1), w = src.size(2), channels = src.size(3), step = pixel_stride(src);
  std::vector<int64_t> rows = source_map(dst_h, kh, h, c, 0, transposed);
  if (c.stride[1] == 1 && kw > 1 && dst_w >= kPanelRows / 2) {
    const int64_t d = c.dilation[1], shift = transposed ? c.padding[1] - (kw - 1) * d : -c.padding[1];
    dsd(SegmentTiles{src.data_ptr<float>(), channels, step, h, w, dst_h, dst_w, kh, kw, batch, shift, d, transposed,
                     std::move(rows)});
  } else {
    dsd(GatherTiles{src.data_ptr<float>(), channels, step, h, w, dst_h, dst_w, kh, kw, batch * dst_h * dst_w,
                    std::move(rows), source_map(dst_w, kw, w, c, 1, transposed)});
  }
}

// The source coordinate of each (destination Y < count, tap) of phase r of `axis`, -1 outside
// [0, src): the gather map of one phase.
std::vector<int64_t> phase_map(const PhaseAxis& axis, int64_t r, int64_t src) {
  const auto& taps = axis.taps[r];
  const int64_t n = static_cast<int64_t>(taps.size());
  std::vector<int64_t> map(axis.count[r] * n);
  for (int64_t y = 0; y < axis.count[r]; ++y)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t source = y + taps[i].second;
      map[y * n + i] = source >= 0 && source < src ? source : -1;
    }
  return map;
}

// dx (NHWC [N, h, w, C]) of a strided convolution with square blocks, one phase (ry, rx) of its
// pixels at a time: each phase is a stride-1 problem over the taps that reach it (for a 3x3
// kernel at stride 2, 1, 2, 2 and 4 of the 9 in the four phases), so that no empty tap is
// gathered or multiplied, as the gather over all taps would. A phase's pixels are computed
// into a buffer, then scattered into dx (one pass over dx: little against the products).
void strided_grad_input(const char* op, const at::Tensor& dy, const float* packed, const at::Tensor& row_idx,
                        const at::Tensor& col_ptr, const at::Tensor& col_slots, const LayoutShape& L, int64_t kh,
                        int64_t kw, const Conv& c, at::Tensor& dx) {
  const int64_t batch = dx.size(0), h = dx.size(1), w = dx.size(2), channels = dx.size(3);
  const int64_t oh = dy.size(1), ow = dy.size(2);
  const PhaseAxis Y = phase_axis(h, oh, kh, c.stride[0], c.padding[0], c.dilation[0]);
  const PhaseAxis X = phase_axis(w, ow, kw, c.stride[1], c.padding[1], c.dilation[1]);
  static thread_local std::vector<float> buffer;
  for (int64_t ry = 0; ry < c.stride[0]; ++ry)
    for (int64_t rx = 0; rx < c.stride[1]; ++rx) {
      const int64_t rows = Y.count[ry], cols = X.count[rx], pixels = batch * rows * cols;
      if (pixels == 0) continue;
      const int64_t th = static_cast<int64_t>(Y.taps[ry].size()), tw = static_cast<int64_t>(X.taps[rx].size());
      float* phase = grow(buffer, static_cast<size_t>(pixels * channels));
      if (th == 0 || tw == 0) {  // no tap reaches these pixels
        std::fill(phase, phase + pixels * channels, 0.f);
      } else {
        GatherTiles tiles{dy.data_ptr<float>(), dy.size(3), pixel_stride(dy), oh, ow, rows, cols, th, tw, pixels,
                          phase_map(Y, ry, oh), phase_map(X, rx, ow)};
        PanelLayout layout = tiles.layout();
        layout.weight_taps = kh * kw;
        for (const auto& [i, ay] : Y.taps[ry])
          for (const auto& [j, ax] : X.taps[rx]) layout.weight_tap.push_back(i * kw + j);
        const PairTable table = make_pairs(op, col_ptr, col_slots, row_idx, L.rows, std::move(layout), L.bo, L.bi,
                                           packed);
        run_dsd(select_isa(), tiles, table, L.bi, nullptr, phase);
      }
      float* out = dx.data_ptr<float>();
      at::parallel_for(0, batch * rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / rows, y = ry + row % rows * c.stride[0];
          for (int64_t x = 0; x < cols; ++x)
            std::memcpy(out + ((n * h + y) * w + rx + x * c.stride[1]) * channels,
                        phase + (row * cols + x) * channels, sizeof(float) * channels);
        }
      });
    }
}

ConvShape conv_shape(int64_t batch, int64_t h, int64_t w, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                     const Conv& c) {
  return {batch, h, w, oh, ow, kh, kw, {c.stride[0], c.stride[1]}, {c.padding[0], c.padding[1]},
          {c.dilation[0], c.dilation[1]}};
}

void check_input(const char* op, const char* name, const at::Tensor& t, int64_t channels) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(1) == channels, op, ": ", name, " must be [N, ", channels,
                    ", H, W], got shape ", t.sizes());
}

// y = conv2d(x, W) + bias: each panel of output pixels gathers its im2col rows once and
// walks every output block's live (block, tap) pairs.
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                const at::Tensor& row_idx, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                const at::Tensor& row_slots, const at::Tensor& col_ptr, const at::Tensor& col_slots,
                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, bool channels_last_out) {
  const char* op = "bsr_conv2d";
  const LayoutShape L = check_layout(op, values, {row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots}, 2);
  check_operand(op, "x", x, values);
  check_input(op, "x", x, L.cols * L.bi);
  const Conv c = check_conv(op, stride, padding, dilation);
  const int64_t kh = values.size(3), kw = values.size(4), out_channels = L.rows * L.bo;
  const int64_t oh = output_size(x.size(2), kh, c, 0), ow = output_size(x.size(3), kw, c, 1);
  TORCH_CHECK_VALUE(kh > 0 && kw > 0 && oh > 0 && ow > 0, op, ": input ", x.sizes(),
                    " is smaller than the dilated kernel ", values.sizes().slice(3));
  check_bias(op, bias, out_channels, values);
  const bool nhwc_out = channels_last_out || is_channels_last(x);
  if (!kernels_take(values.scalar_type(), L.bo, L.bi)) {
    const at::Tensor y = at::conv2d(x, dense_weight(values, L, row_idx, col_idx), bias, stride, padding, dilation);
    return y.contiguous(nhwc_out ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  const at::Tensor src = channels_last(as_float(x));
  const float* packed = pack_weights(as_float(values), true);  // [nnz][kh][kw][bi][bo]
  const at::Tensor b = bias ? as_float(*bias).contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), oh, ow, out_channels}, src.options());
  with_tiles(src, x.size(0), oh, ow, kh, kw, c, false, [&](const auto& tiles) {
    const PairTable table =
        make_pairs(op, row_ptr, row_slots, col_idx, L.cols, tiles.layout(), L.bi, L.bo, packed);
    run_dsd(select_isa(), tiles, table, L.bo, b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  });
  return finish(y, nhwc_out, x.scalar_type());
}

// dx = conv_transpose2d(dy, W): each panel of input pixels gathers the output pixels that
// each tap maps onto it and walks each input block's pairs; a strided convolution phase by
// phase (strided_grad_input), so that only the taps that reach a pixel are gathered.
at::Tensor conv2d_grad_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& row_idx,
                           const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                           const at::Tensor& col_ptr, const at::Tensor& col_slots, c10::IntArrayRef input_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "bsr_conv2d_grad_input";
  const LayoutShape L = check_layout(op, values, {row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots}, 2);
  check_operand(op, "grad_out", grad_out, values);
  check_input(op, "grad_out", grad_out, L.rows * L.bo);
  const Conv c = check_conv(op, stride, padding, dilation);
  TORCH_CHECK_VALUE(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0, op,
                    ": input_size must be a positive pair, got ", input_size);
  const int64_t kh = values.size(3), kw = values.size(4), h = input_size[0], w = input_size[1];
  const int64_t oh = output_size(h, kh, c, 0), ow = output_size(w, kw, c, 1);
  TORCH_CHECK_VALUE(grad_out.size(2) == oh && grad_out.size(3) == ow, op, ": grad_out of shape ", grad_out.sizes(),
                    " does not fit input size ", input_size);
  const int64_t in_channels = L.cols * L.bi;
  if (!kernels_take(values.scalar_type(), L.bo, L.bi)) {
    // conv_transpose2d, with the output padding that gives back the input size.
    std::vector<int64_t> extra(2);
    for (int d = 0; d < 2; ++d)
      extra[d] = input_size[d] - ((grad_out.size(2 + d) - 1) * c.stride[d] - 2 * c.padding[d] +
                                  c.dilation[d] * (values.size(3 + d) - 1) + 1);
    const at::Tensor dx = at::conv_transpose2d(grad_out, dense_weight(values, L, row_idx, col_idx), {}, stride,
                                               padding, extra, 1, dilation);
    return dx.contiguous(is_channels_last(grad_out) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  const float* packed = pack_weights(as_float(values), false);  // [nnz][kh][kw][bo][bi]
  if (L.bi == 1) {  // vector blocks: channel-major (vector_blocks.h)
    const at::Tensor dy = as_float(grad_out);
    at::Tensor dx = at::empty({grad_out.size(0), in_channels, h, w}, dy.options().memory_format(
        is_channels_last(grad_out) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    vector_grad_input(op, select_isa(), Strided::of(dy), packed, row_idx, col_ptr, col_slots, L,
                      conv_shape(grad_out.size(0), h, w, grad_out.size(2), grad_out.size(3), kh, kw, c), Strided::of(dx));
    return dx.to(grad_out.scalar_type());
  }
  const at::Tensor src = pixel_rows(as_float(grad_out));
  at::Tensor dx = at::empty({grad_out.size(0), h, w, in_channels}, src.options());
  if (c.stride[0] > 1 || c.stride[1] > 1) {
    strided_grad_input(op, src, packed, row_idx, col_ptr, col_slots, L, kh, kw, c, dx);
  } else {
    with_tiles(src, grad_out.size(0), h, w, kh, kw, c, true, [&](const auto& tiles) {
      const PairTable table =
          make_pairs(op, col_ptr, col_slots, row_idx, L.rows, tiles.layout(), L.bo, L.bi, packed);
      run_dsd(select_isa(), tiles, table, L.bi, nullptr, dx.data_ptr<float>());
    });
  }
  return finish(dx, is_channels_last(grad_out), grad_out.scalar_type());
}

// Output columns [lo, hi) whose tap j reads an input column inside the image, on axis d.
std::pair<int64_t, int64_t> valid_range(int64_t out, int64_t in, int64_t j, const Conv& c, int d) {
  const int64_t shift = j * c.dilation[d] - c.padding[d];  // input column of output column x: x * s + shift
  const int64_t lo = shift >= 0 ? 0 : (-shift + c.stride[d] - 1) / c.stride[d];
  const int64_t last = in - 1 - shift;  // x * s <= last
  const int64_t hi = last < 0 ? 0 : std::min(out, last / c.stride[d] + 1);
  return {lo, std::max(lo, hi)};
}

// dW at the live blocks, [nnz, bo, bi, kh, kw]: a reduction over every output pixel. For each
// chunk of output rows and each tap, the runs of output pixels whose tap lands inside the
// input, read in place (no im2col copy); see run_sdd.
at::Tensor conv2d_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_idx,
                            const at::Tensor& col_idx, const at::Tensor& row_ptr, const at::Tensor& row_slots,
                            const at::Tensor& col_ptr, const at::Tensor& col_slots, c10::IntArrayRef block_shape,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "bsr_conv2d_grad_weight";
  TORCH_CHECK_VALUE(block_shape.size() == 4 && block_shape[2] > 0 && block_shape[3] > 0, op,
                    ": block_shape must be [bo, bi, kh, kw], got ", block_shape);
  const int64_t bo = block_shape[0], bi = block_shape[1], kh = block_shape[2], kw = block_shape[3];
  const LayoutIndex index{row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots};
  const LayoutShape L = check_index(op, index, row_idx.size(0), bo, bi, x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                   dtype_name(x.scalar_type()));
  check_operand(op, "grad_out", grad_out, x, "x");
  const int64_t cin = L.cols * bi, cout = L.rows * bo;
  check_input(op, "x", x, cin);
  check_input(op, "grad_out", grad_out, cout);
  const Conv c = check_conv(op, stride, padding, dilation);
  const int64_t h = x.size(2), w = x.size(3), oh = output_size(h, kh, c, 0), ow = output_size(w, kw, c, 1);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(2) == oh && grad_out.size(3) == ow, op,
                    ": grad_out ", grad_out.sizes(), " does not fit x ", x.sizes(), " and the convolution");
  if (!kernels_take(x.scalar_type(), bo, bi)) {
    const at::Tensor weight = at::zeros({cout, cin, kh, kw}, x.options());
    const at::Tensor dense = std::get<1>(at::convolution_backward(
        grad_out, x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1, {false, true, false}));
    return live_blocks(dense, L, row_idx, col_idx);
  }
  check_slots(op, row_idx, col_idx, bi == 1 ? row_slots : col_slots, L.rows, L.cols);
  // dy's pixels dy_stride floats apart (a channel slice is read in place), x's cin
  const at::Tensor dy = pixel_rows(as_float(grad_out));
  const at::Tensor src = channels_last(as_float(x));
  const int64_t dy_stride = pixel_stride(dy);
  if (bi == 1) {  // vector blocks (vector_blocks.h)
    static thread_local std::vector<float> buffer;  // [nnz][taps][bo]
    float* acc = grow(buffer, static_cast<size_t>(L.nnz * kh * kw * bo));
    vector_grad_weight(op, select_isa(), dy.data_ptr<float>(), dy_stride, src.data_ptr<float>(), col_idx, row_ptr,
                       row_slots, L, conv_shape(x.size(0), h, w, oh, ow, kh, kw, c), acc);
    const at::Tensor by_tap = at::from_blob(acc, {L.nnz, kh, kw, bo, bi}, src.options());
    return by_tap.permute({0, 3, 4, 1, 2}).to(x.scalar_type(), false, true, at::MemoryFormat::Contiguous);
  }
  const int64_t taps = kh * kw, out_rows = x.size(0) * oh, rows_per_chunk = std::max<int64_t>(1, 256 / ow);
  static thread_local SddPlan plan;
  plan.reset(taps);
  for (int64_t r0 = 0; r0 < out_rows; r0 += rows_per_chunk, ++plan.chunks)
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int64_t i = tap / kw, j = tap % kw;
      const auto [lo, hi] = valid_range(ow, w, j, c, 1);
      const int64_t sx = lo * c.stride[1] + j * c.dilation[1] - c.padding[1];
      for (int64_t row = r0; row < std::min(out_rows, r0 + rows_per_chunk) && lo < hi; ++row) {
        const int64_t n = row / oh, sy = row % oh * c.stride[0] + i * c.dilation[0] - c.padding[0];
        if (sy >= 0 && sy < h) plan.add((row * ow + lo) * dy_stride, ((n * h + sy) * w + sx) * cin, hi - lo,
                                        dy_stride, c.stride[1] * cin);
      }
      plan.close();
    }
  static thread_local std::vector<float> buffer;  // [nnz][taps][bo][bi]
  float* acc = grow(buffer, static_cast<size_t>(L.nnz * taps * bo * bi));
  run_sdd(select_isa(), dy.data_ptr<float>(), dy_stride, src.data_ptr<float>(), c.stride[1] * cin, plan,
          row_idx.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), col_slots.data_ptr<int32_t>(), L.nnz, bo, bi, acc);
  const at::Tensor by_tap = at::from_blob(acc, {L.nnz, kh, kw, bo, bi}, src.options());
  return by_tap.permute({0, 3, 4, 1, 2}).to(x.scalar_type(), false, true, at::MemoryFormat::Contiguous);
}
}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("bsr_conv2d", &conv2d);
  m.impl("bsr_conv2d_grad_input", &conv2d_grad_input);
  m.impl("bsr_conv2d_grad_weight", &conv2d_grad_weight);
}

}  // namespace cpu
}  // namespace sparse_kernels
