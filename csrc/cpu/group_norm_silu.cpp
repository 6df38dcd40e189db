// The CPU kernels of GroupNorm + SiLU in one op: y = silu(group_norm(x)), the pair that diffusers'
// ResnetBlock2D calls back to back, twice per block (sparse_kernels/group_norm_silu).
//
// Over channels-last pixels, per image n and group g of C / G channels, mean and rstd over the
// group's M = H * W * C / G values; with A = rstd * weight[c] and B = bias[c] - mean * A, z = x * A + B
// and y = z * sigmoid(z). Forward: one pass for the moments of x less a pivot per (image,
// channel), the image's first pixel (fp32 over chunks of kRows pixels, fp64 across chunks: no
// cancellation however large the mean against the spread), one pass writing y. Backward, with dz = dy * silu'(z) recomputed from x:
//   dbias[c] = sum dz, dweight[c] = sum dz * (x - mean) * rstd,
//   dx = A dz + a_g x + b_g, a_g = -rstd^3 G2 / M, b_g = rstd (mean rstd^2 G2 - G1) / M,
// where G1 = sum_{c in g} weight[c] sum dz and G2 = sum_{c in g} weight[c] sum dz (x - mean): one
// pass writes dz into dx and sums it, one turns it into dx in place (the exp, the costly part,
// once per value). Every pass is parallel over (image, chunk of pixels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "driver.h"

namespace sparse_kernels {
namespace cpu {
namespace {

constexpr int64_t kRows = 64;  // pixels per chunk: the chunk's rows stay in L1 across a row of vectors

struct Shape {
  int64_t batch, channels, pixels, groups, chunks;
  int64_t per_group() const { return channels / groups; }
  int64_t items() const { return batch * chunks; }
};

Shape check(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups) {
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
  const int64_t pixels = x.size(2) * x.size(3);
  return {x.size(0), channels, pixels, groups, std::max<int64_t>(ceil_div(pixels, kRows), 1)};
}

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// Calls body(n, chunk, rows of the chunk, its first pixel's offset in floats) for every item, in parallel.
template <class Body>
void for_chunks(const Shape& s, Body body) {
  at::parallel_for(0, s.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / s.chunks, chunk = item % s.chunks, p0 = chunk * kRows;
      const int64_t rows = std::max<int64_t>(std::min(kRows, s.pixels - p0), 0);
      body(n, chunk, rows, (n * s.pixels + p0) * s.channels);
    }
  });
}

// Per-channel sums over each image's pixels, in fp64: sums[n][c] and sums2[n][c]. `kernel`
// accumulates a chunk's fp32 sums into the NormRows it is given.
template <class Kernel>
void channel_sums(const Shape& s, NormRows base, Kernel kernel, std::vector<double>& sums, std::vector<double>& sums2,
                  const float* scale, const float* shift, float* out = nullptr) {
  static thread_local std::vector<float> storage;  // the calling thread's; the workers write their items' rows
  float* part = grow(storage, static_cast<size_t>(s.items() * s.channels * 2));
  std::fill(part, part + s.items() * s.channels * 2, 0.0f);
  for_chunks(s, [&](int64_t n, int64_t chunk, int64_t rows, int64_t offset) {
    NormRows t = base;
    t.x = base.x + offset;
    t.dy = base.dy ? base.dy + offset : nullptr;
    t.rows = rows;
    t.scale = scale ? scale + n * s.channels : nullptr;
    t.shift = shift ? shift + n * s.channels : nullptr;
    t.out = out ? out + offset : nullptr;
    t.sum = part + (n * s.chunks + chunk) * s.channels * 2;
    t.sum2 = t.sum + s.channels;
    kernel(t);
  });
  sums.assign(static_cast<size_t>(s.batch * s.channels), 0.0);
  sums2.assign(sums.size(), 0.0);
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
      const float* p = part + (n * s.chunks + chunk) * s.channels * 2;
      for (int64_t c = 0; c < s.channels; ++c) {
        sums[n * s.channels + c] += p[c];
        sums2[n * s.channels + c] += p[s.channels + c];
      }
    }
}

// scale[n][c] = rstd * weight[c], shift[n][c] = bias[c] - mean * scale[n][c].
void affine(const Shape& s, const float* mean, const float* rstd, const float* weight, const float* bias,
            std::vector<float>& scale, std::vector<float>& shift) {
  scale.resize(static_cast<size_t>(s.batch * s.channels));
  shift.resize(scale.size());
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t c = 0; c < s.channels; ++c) {
      const int64_t g = n * s.groups + c / s.per_group();
      scale[n * s.channels + c] = rstd[g] * weight[c];
      shift[n * s.channels + c] = bias[c] - mean[g] * rstd[g] * weight[c];
    }
}

NormRows rows_of(const float* x, const float* dy, int64_t channels) {
  return {x, dy, 0, channels, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                                       const at::Tensor& bias, int64_t groups, double eps) {
  const char* op = "group_norm_silu";
  const Shape s = check(op, input, weight, bias, groups);
  const Isa& isa = select_isa();
  const at::Tensor x = channels_last(input), w = weight.contiguous(), b = bias.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({s.batch, s.groups}, x.options()), rstd = at::empty({s.batch, s.groups}, x.options());
  if (x.numel() == 0) return {input.is_contiguous() ? y.contiguous() : y, mean.fill_(0), rstd.fill_(0)};
  const float* xd = x.data_ptr<float>();
  std::vector<float> pivot(static_cast<size_t>(s.batch * s.channels));  // x at each image's first pixel
  for (int64_t n = 0; n < s.batch; ++n)
    std::copy(xd + n * s.pixels * s.channels, xd + (n * s.pixels + 1) * s.channels, pivot.data() + n * s.channels);
  std::vector<double> sums, sums2;  // of d = x - pivot, per (image, channel)
  channel_sums(s, rows_of(xd, nullptr, s.channels), isa.norm_moments, sums, sums2, nullptr, pivot.data());
  const double count = static_cast<double>(s.pixels * s.per_group());
  float* m = mean.data_ptr<float>();
  float* r = rstd.data_ptr<float>();
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t c0 = g * s.per_group(), c1 = c0 + s.per_group();
      double total = 0;
      for (int64_t c = c0; c < c1; ++c)
        total += sums[n * s.channels + c] + static_cast<double>(s.pixels) * pivot[n * s.channels + c];
      const double mu = total / count;
      // sum over the group of (x - mu)^2 = sum_c sum2_c + 2 (p_c - mu) sum_c + pixels (p_c - mu)^2
      double centred2 = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const double p = pivot[n * s.channels + c] - mu;
        centred2 += sums2[n * s.channels + c] + 2 * p * sums[n * s.channels + c] + s.pixels * p * p;
      }
      const double var = std::max(centred2 / count, 0.0);
      m[n * s.groups + g] = static_cast<float>(mu);
      r[n * s.groups + g] = static_cast<float>(1.0 / std::sqrt(var + eps));
    }
  std::vector<float> scale, shift;
  affine(s, m, r, w.data_ptr<float>(), b.data_ptr<float>(), scale, shift);
  float* yd = y.data_ptr<float>();
  for_chunks(s, [&](int64_t n, int64_t, int64_t rows, int64_t offset) {
    NormRows t = rows_of(xd + offset, nullptr, s.channels);
    t.rows = rows;
    t.scale = scale.data() + n * s.channels;
    t.shift = shift.data() + n * s.channels;
    t.out = yd + offset;
    isa.norm_silu(t);
  });
  // The memory format of the input: channels-last in, channels-last out; NCHW in, NCHW out.
  return {input.is_contiguous() && !input.is_contiguous(at::MemoryFormat::ChannelsLast) ? y.contiguous() : y, mean,
          rstd};
}

at::Tensor group_norm_silu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                           double eps) {
  return std::get<0>(forward(x, weight, bias, groups, eps));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& input,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        int64_t groups) {
  const char* op = "group_norm_silu_backward";
  const Shape s = check(op, input, weight, bias, groups);
  TORCH_CHECK_VALUE(grad_y.sizes() == input.sizes() && grad_y.scalar_type() == at::kFloat, op,
                    ": grad_y must be float32 of x's shape ", input.sizes(), ", got ", grad_y.scalar_type(), " ",
                    grad_y.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}})
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == s.batch && t.size(1) == s.groups,
                      op, ": ", name, " must be float32 [", s.batch, ", ", s.groups, "], got ", t.scalar_type(), " ",
                      t.sizes());
  const Isa& isa = select_isa();
  const at::Tensor x = channels_last(input), dy = channels_last(grad_y), w = weight.contiguous();
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dweight = at::zeros_like(w), dbias = at::zeros_like(w);
  if (x.numel() == 0) return {dx, dweight, dbias};
  const float* m = mu.data_ptr<float>();
  const float* r = rs.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  std::vector<float> scale, shift;
  affine(s, m, r, wd, bias.contiguous().data_ptr<float>(), scale, shift);
  std::vector<double> s1, s2;  // sum dz, sum dz * x per (image, channel)
  float* dxd = dx.data_ptr<float>();
  channel_sums(s, rows_of(x.data_ptr<float>(), dy.data_ptr<float>(), s.channels), isa.norm_silu_grad_sums, s1, s2,
               scale.data(), shift.data(), dxd);
  const double count = static_cast<double>(s.pixels * s.per_group());
  std::vector<float> ga(scale.size()), gb(scale.size());
  std::vector<double> dw(static_cast<size_t>(s.channels), 0.0), db(dw.size(), 0.0);
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t g = 0; g < s.groups; ++g) {
      const double mg = m[n * s.groups + g], rg = r[n * s.groups + g];
      double g1 = 0, g2 = 0;
      for (int64_t c = g * s.per_group(); c < (g + 1) * s.per_group(); ++c) {
        const double sum = s1[n * s.channels + c], centred = s2[n * s.channels + c] - mg * sum;
        g1 += wd[c] * sum;
        g2 += wd[c] * centred;
        db[c] += sum;
        dw[c] += rg * centred;
      }
      const double a = -rg * rg * rg * g2 / count, b = rg * (mg * rg * rg * g2 - g1) / count;
      for (int64_t c = g * s.per_group(); c < (g + 1) * s.per_group(); ++c) {
        ga[n * s.channels + c] = static_cast<float>(a);
        gb[n * s.channels + c] = static_cast<float>(b);
      }
    }
  float* dwd = dweight.data_ptr<float>();
  float* dbd = dbias.data_ptr<float>();
  for (int64_t c = 0; c < s.channels; ++c) {
    dwd[c] = static_cast<float>(dw[c]);
    dbd[c] = static_cast<float>(db[c]);
  }
  const float* xd = x.data_ptr<float>();
  for_chunks(s, [&](int64_t n, int64_t, int64_t rows, int64_t offset) {
    NormRows t = rows_of(xd + offset, nullptr, s.channels);
    t.rows = rows;
    t.scale = scale.data() + n * s.channels;
    t.ga = ga.data() + n * s.channels;
    t.gb = gb.data() + n * s.channels;
    t.out = dxd + offset;
    isa.norm_silu_grad(t);
  });
  return {input.is_contiguous() && !input.is_contiguous(at::MemoryFormat::ChannelsLast) ? dx.contiguous() : dx,
          dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("group_norm_silu_forward", &forward);
  m.impl("group_norm_silu_backward", &backward);
}

}  // namespace cpu
}  // namespace sparse_kernels
