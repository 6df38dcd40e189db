// The CPU kernels of GroupNorm + SiLU in one op: y = silu(group_norm(x)), the pair that diffusers'
// ResnetBlock2D calls back to back, twice per block (sparse_kernels/group_norm_silu).
//
// Over channels-last pixels, per image n and group g of C / G channels, mean and rstd over the
// group's M = H * W * C / G values; with A = rstd * weight[c] and B = bias[c] - mean * A, z = x * A + B
// and y = z * sigmoid(z). Forward: one pass for the moments of x less a pivot per (image,
// channel), the image's first pixel (fp32 over chunks of kRows pixels, fp64 across chunks: no
// cancellation however large the mean against the spread), one pass writing y. Backward, with
// dz = dy * silu'(z) recomputed from x:
//   dbias[c] = sum dz, dweight[c] = sum dz * (x - mean) * rstd,
//   dx = A dz + a_g x + b_g, a_g = -rstd^3 G2 / M, b_g = rstd (mean rstd^2 G2 - G1) / M,
// where G1 = sum_{c in g} weight[c] sum dz and G2 = sum_{c in g} weight[c] sum dz (x - mean): one
// pass writes dz into dx and sums it, one turns it into dx in place (the exp, the costly part,
// once per value).
// With a shift s [N, C] (diffusers adds the time embedding to a block's activation right before
// its second norm), x + s is normalised without being formed: its moments are x's less the same
// pivot, and s enters only per-channel constants, B += s A, sum dz (x + s - mean) = sum dz x + (s -
// mean) sum dz and b_g += a_g s; the shift's gradient, sum over the pixels of dx, is summed as dx is
// written.
// The statistics are per image, so an image is done whole, both passes back to back: its second
// pass reads what the first left in L2 (an image of the demo UNet is 25-100 KB per tensor), and
// the images are shared among the threads. With fewer images than threads, the images go one
// after another and each pass is shared among the threads by chunks instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "driver.h"

namespace sparse_kernels {
namespace cpu {
namespace {

constexpr int64_t kRows = 64;  // pixels per chunk: the chunk's rows stay in L1 across a row of vectors

struct Shape {
  int64_t batch, channels, pixels, groups, chunks;
  bool by_image;  // images shared among the threads (else: the chunks of each image)
  int64_t per_group() const { return channels / groups; }
  int64_t image() const { return pixels * channels; }  // floats per image
};

Shape check(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
            const std::optional<at::Tensor>& shift) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"weight", weight}, {"bias", bias}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  }
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && channels % groups == 0, op, ": groups must divide the ", channels,
                    " channels, got ", groups);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == channels && bias.dim() == 1 && bias.size(0) == channels,
                    op, ": weight and bias must have shape [", channels, "], got ", weight.sizes(), " and ",
                    bias.sizes());
  if (shift) {
    TORCH_CHECK_TYPE(shift->scalar_type() == at::kFloat, op, ": shift must be float32, got ", shift->scalar_type());
    TORCH_CHECK_VALUE(shift->device().is_cpu(), op, ": shift must be on the CPU, got ", shift->device());
    TORCH_CHECK_VALUE(shift->dim() == 2 && shift->size(0) == x.size(0) && shift->size(1) == channels, op,
                      ": shift must have shape [", x.size(0), ", ", channels, "], got ", shift->sizes());
  }
  const int64_t pixels = x.size(2) * x.size(3);
  return {x.size(0), channels, pixels, groups, std::max<int64_t>(ceil_div(pixels, kRows), 1),
          x.size(0) >= at::get_num_threads()};
}

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// Calls body(i) for i < count: shared among the threads when `parallel`, else one after another.
template <class Body>
void for_each(int64_t count, bool parallel, Body body) {
  if (!parallel) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

// Runs `kernel` on every chunk of pixels of the image whose rows `base` points at (x, dy, out
// at the image's first pixel), in parallel unless the images are. With `sums`: each chunk sums
// into its own fp32 partial sums, added up in fp64 into sums[c] and sums2[c].
template <class Kernel>
void over_image(const Shape& s, const NormRows& base, Kernel kernel, double* sums = nullptr, double* sums2 = nullptr) {
  static thread_local std::vector<float> storage;  // this image's partial sums: [chunk][sum, sum2][channel]
  float* part = nullptr;
  if (sums) {
    part = grow(storage, static_cast<size_t>(s.chunks * s.channels * 2));
    std::fill(part, part + s.chunks * s.channels * 2, 0.0f);
  }
  const auto chunk = [&](int64_t index) {
    const int64_t p0 = index * kRows, offset = p0 * s.channels;
    NormRows t = base;
    t.rows = std::max<int64_t>(std::min(kRows, s.pixels - p0), 0);
    t.x += offset;
    if (t.dy) t.dy += offset;
    if (t.out) t.out += offset;
    if (part) {
      t.sum = part + index * s.channels * 2;
      t.sum2 = t.sum + s.channels;
    }
    kernel(t);
  };
  for_each(s.chunks, !s.by_image, chunk);
  if (!sums) return;
  std::fill(sums, sums + s.channels, 0.0);
  std::fill(sums2, sums2 + s.channels, 0.0);
  for (int64_t index = 0; index < s.chunks; ++index)
    for (int64_t c = 0; c < s.channels; ++c) {
      sums[c] += part[index * s.channels * 2 + c];
      sums2[c] += part[index * s.channels * 2 + s.channels + c];
    }
}

// scale[c] = rstd * weight[c], shift[c] = bias[c] + (x_shift[c] - mean) * scale[c] for one image
// (x_shift: the shift added to x), so that z = x * scale + shift.
void affine(const Shape& s, const float* mean, const float* rstd, const float* weight, const float* bias, float* scale,
            float* shift, const float* x_shift) {
  for (int64_t c = 0; c < s.channels; ++c) {
    const int64_t g = c / s.per_group();
    scale[c] = rstd[g] * weight[c];
    shift[c] = bias[c] + (x_shift[c] - mean[g]) * rstd[g] * weight[c];
  }
}

NormRows rows_of(const float* x, const float* dy, float* out, int64_t channels) {
  return {x, dy, 0, channels, nullptr, nullptr, nullptr, nullptr, out, nullptr, nullptr};
}

// The memory format of the input: channels-last in, channels-last out; NCHW in, NCHW out.
at::Tensor like_input(const at::Tensor& input, const at::Tensor& t) {
  return input.is_contiguous() && !input.is_contiguous(at::MemoryFormat::ChannelsLast) ? t.contiguous() : t;
}

// The shift's values [N, C], contiguous: zeros without one (x + 0 is x).
const float* shift_data(const std::optional<at::Tensor>& shift, const Shape& s, at::Tensor& keep) {
  keep = shift ? shift->contiguous() : at::zeros({s.batch, s.channels}, at::kFloat);
  return keep.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                                       const at::Tensor& bias, int64_t groups, double eps,
                                                       const std::optional<at::Tensor>& shift) {
  const char* op = "group_norm_silu";
  const Shape s = check(op, input, weight, bias, groups, shift);
  const Isa& isa = select_isa();
  const at::Tensor x = channels_last(input), w = weight.contiguous(), b = bias.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::zeros({s.batch, s.groups}, x.options()), rstd = at::zeros({s.batch, s.groups}, x.options());
  if (x.numel() == 0) return {like_input(input, y), mean, rstd};
  const float *xd = x.data_ptr<float>(), *wd = w.data_ptr<float>(), *bd = b.data_ptr<float>();
  float *yd = y.data_ptr<float>(), *md = mean.data_ptr<float>(), *rd = rstd.data_ptr<float>();
  at::Tensor shift_values;
  const float* sd = shift_data(shift, s, shift_values);
  const double count = static_cast<double>(s.pixels * s.per_group());
  for_each(s.batch, s.by_image, [&](int64_t n) {
    const float* image = xd + n * s.image();
    const float* sh = sd + n * s.channels;
    std::vector<float> pivot(image, image + s.channels), scale(s.channels), shift(s.channels);  // pivot: x at pixel 0
    std::vector<double> sums(s.channels), sums2(s.channels);  // of d = x - pivot
    NormRows moments = rows_of(image, nullptr, nullptr, s.channels);
    moments.shift = pivot.data();
    over_image(s, moments, isa.norm_moments, sums.data(), sums2.data());
    float *m = md + n * s.groups, *r = rd + n * s.groups;
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t c0 = g * s.per_group(), c1 = c0 + s.per_group();
      // the pivot of x + shift is pivot + shift, and the sums of (x + shift) less it are those of x
      const auto pivot_of = [&](int64_t c) { return static_cast<double>(pivot[c]) + sh[c]; };
      double total = 0;
      for (int64_t c = c0; c < c1; ++c) total += sums[c] + static_cast<double>(s.pixels) * pivot_of(c);
      const double mu = total / count;
      // sum over the group of (x - mu)^2 = sum_c sum2_c + 2 (p_c - mu) sum_c + pixels (p_c - mu)^2
      double centred2 = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const double p = pivot_of(c) - mu;
        centred2 += sums2[c] + 2 * p * sums[c] + static_cast<double>(s.pixels) * p * p;
      }
      m[g] = static_cast<float>(mu);
      r[g] = static_cast<float>(1.0 / std::sqrt(std::max(centred2 / count, 0.0) + eps));
    }
    affine(s, m, r, wd, bd, scale.data(), shift.data(), sh);
    NormRows out = rows_of(image, nullptr, yd + n * s.image(), s.channels);
    out.scale = scale.data();
    out.shift = shift.data();
    over_image(s, out, isa.norm_silu);
  });
  return {like_input(input, y), mean, rstd};
}

at::Tensor group_norm_silu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                           double eps, const std::optional<at::Tensor>& shift) {
  return std::get<0>(forward(x, weight, bias, groups, eps, shift));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t groups, const std::optional<at::Tensor>& shift) {
  const char* op = "group_norm_silu_backward";
  const Shape s = check(op, input, weight, bias, groups, shift);
  TORCH_CHECK_VALUE(grad_y.sizes() == input.sizes() && grad_y.scalar_type() == at::kFloat, op,
                    ": grad_y must be float32 of x's shape ", input.sizes(), ", got ", grad_y.scalar_type(), " ",
                    grad_y.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}})
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == s.batch && t.size(1) == s.groups,
                      op, ": ", name, " must be float32 [", s.batch, ", ", s.groups, "], got ", t.scalar_type(), " ",
                      t.sizes());
  const Isa& isa = select_isa();
  const at::Tensor x = channels_last(input), dy = channels_last(grad_y), w = weight.contiguous();
  const at::Tensor b = bias.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dweight = at::zeros_like(w), dbias = at::zeros_like(w);
  at::Tensor dshift = shift ? at::zeros({s.batch, s.channels}, x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {like_input(input, dx), dweight, dbias, dshift};
  at::Tensor shift_values;
  const float* sd = shift_data(shift, s, shift_values);
  float* dsd = shift ? dshift.data_ptr<float>() : nullptr;
  const float *xd = x.data_ptr<float>(), *dyd = dy.data_ptr<float>(), *wd = w.data_ptr<float>();
  const float *bd = b.data_ptr<float>(), *md = mu.data_ptr<float>(), *rd = rs.data_ptr<float>();
  float* dxd = dx.data_ptr<float>();
  const double count = static_cast<double>(s.pixels * s.per_group());
  // Per image: dweight's and dbias's terms, added up over the images afterwards.
  std::vector<double> dw(static_cast<size_t>(s.batch * s.channels)), db(dw.size());
  for_each(s.batch, s.by_image, [&](int64_t n) {
    std::vector<float> scale(s.channels), shift(s.channels), ga(s.channels), gb(s.channels);
    std::vector<double> s1(s.channels), s2(s.channels);  // sum dz, sum dz * x
    const float *m = md + n * s.groups, *r = rd + n * s.groups;
    const float* sh = sd + n * s.channels;
    affine(s, m, r, wd, bd, scale.data(), shift.data(), sh);
    NormRows sums = rows_of(xd + n * s.image(), dyd + n * s.image(), dxd + n * s.image(), s.channels);
    sums.scale = scale.data();
    sums.shift = shift.data();
    over_image(s, sums, isa.norm_silu_grad_sums, s1.data(), s2.data());
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t c0 = g * s.per_group(), c1 = c0 + s.per_group();
      const double mg = m[g], rg = r[g];
      double g1 = 0, g2 = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const double centred = s2[c] + (sh[c] - mg) * s1[c];  // sum dz (x + shift - mean)
        g1 += wd[c] * s1[c];
        g2 += wd[c] * centred;
        db[n * s.channels + c] = s1[c];
        dw[n * s.channels + c] = rg * centred;
      }
      const double a = -rg * rg * rg * g2 / count, bg = rg * (mg * rg * rg * g2 - g1) / count;
      std::fill(ga.begin() + c0, ga.begin() + c1, static_cast<float>(a));
      for (int64_t c = c0; c < c1; ++c) gb[c] = static_cast<float>(bg + a * sh[c]);
    }
    NormRows out = rows_of(xd + n * s.image(), nullptr, dxd + n * s.image(), s.channels);
    out.scale = scale.data();
    out.ga = ga.data();
    out.gb = gb.data();
    if (!dsd) {
      over_image(s, out, isa.norm_silu_grad);
      return;
    }
    std::vector<double> total(s.channels), unused(s.channels);  // the shift's gradient: dx summed
    over_image(s, out, isa.norm_silu_grad, total.data(), unused.data());
    for (int64_t c = 0; c < s.channels; ++c) dsd[n * s.channels + c] = static_cast<float>(total[c]);
  });
  float *dwd = dweight.data_ptr<float>(), *dbd = dbias.data_ptr<float>();
  for (int64_t c = 0; c < s.channels; ++c) {
    double wsum = 0, bsum = 0;
    for (int64_t n = 0; n < s.batch; ++n) {
      wsum += dw[n * s.channels + c];
      bsum += db[n * s.channels + c];
    }
    dwd[c] = static_cast<float>(wsum);
    dbd[c] = static_cast<float>(bsum);
  }
  return {like_input(input, dx), dweight, dbias, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("group_norm_silu_forward", &forward);
  m.impl("group_norm_silu_backward", &backward);
}

}  // namespace cpu
}  // namespace sparse_kernels
