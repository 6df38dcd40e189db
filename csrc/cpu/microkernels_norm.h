// The inner loops of GroupNorm + SiLU over channels-last rows (group_norm_silu.cpp): channels
// along the vector lanes, one pixel per row. Included after microkernels.h by each instruction
// set's translation unit, under the same rules (nothing included, nothing called outside it):
// exp is computed here, in vectors.
#include "isa.h"

namespace sparse_kernels {
namespace cpu {
namespace SK_ISA {
namespace {

typedef int ivec __attribute__((vector_size(SK_VW * 4)));

inline vec splat(float v) { return vec{} + v; }

// e^x to about 2 ulp for x in [-87, 88] (clamped outside): x = n ln 2 + r with |r| <= ln 2 / 2,
// e^r by its degree-6 Taylor polynomial (Horner), 2^n put in the exponent bits.
inline vec exp_vec(vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const vec t = x * 1.44269504088896341f;
  const ivec n = __builtin_convertvector(t + (t >= splat(0.0f) ? splat(0.5f) : splat(-0.5f)), ivec);
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  // ln 2 in two parts: r exact
  vec p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline vec sigmoid_vec(vec z) { return 1.0f / (1.0f + exp_vec(-z)); }

// Channels c0 .. c0 + SK_VW of `rows` rows, or the last `tail` < SK_VW channels (through a
// zero-padded copy of each row's tail).
template <class Body>
inline void over_channels(const NormRows& t, Body body) {
  const int64_t full = t.channels / SK_VW * SK_VW;
  for (int64_t c = 0; c < full; c += SK_VW) body(c, SK_VW);
  if (full < t.channels) body(full, t.channels - full);
}

inline vec load_part(const float* p, int64_t count) {
  if (count == SK_VW) return load(p);
  float tmp[SK_VW] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = p[i];
  return load(tmp);
}
inline void store_part(float* p, vec v, int64_t count) {
  if (count == SK_VW) return store(p, v);
  float tmp[SK_VW];
  store(tmp, v);
  for (int64_t i = 0; i < count; ++i) p[i] = tmp[i];
}

// The derivative of silu at z = x * scale + shift, times dy.
inline vec silu_grad(vec dy, vec z) {
  const vec s = sigmoid_vec(z);
  return dy * s * (1.0f + z * (1.0f - s));
}

}  // namespace

// With d = x[r][c] - shift[c] (a pivot close to the channel's values, so that the sums do not
// cancel): sum[c] += d, sum2[c] += d^2 over the rows.
void norm_moments(const NormRows& t) {
  over_channels(t, [&](int64_t c, int64_t count) {
    const vec pivot = load_part(t.shift + c, count);
    vec s{}, s2{};
    for (int64_t r = 0; r < t.rows; ++r) {
      const vec x = load_part(t.x + r * t.channels + c, count) - pivot;
      s += x;
      s2 += x * x;
    }
    store_part(t.sum + c, load_part(t.sum + c, count) + s, count);
    store_part(t.sum2 + c, load_part(t.sum2 + c, count) + s2, count);
  });
}

// out[r][c] = silu(x[r][c] * scale[c] + shift[c]).
void norm_silu(const NormRows& t) {
  over_channels(t, [&](int64_t c, int64_t count) {
    const vec a = load_part(t.scale + c, count), b = load_part(t.shift + c, count);
    for (int64_t r = 0; r < t.rows; ++r) {
      const vec z = load_part(t.x + r * t.channels + c, count) * a + b;
      store_part(t.out + r * t.channels + c, z * sigmoid_vec(z), count);
    }
  });
}

// dz = dy * silu'(x * scale + shift) into out; sum[c] += dz, sum2[c] += dz * x over the rows.
void norm_silu_grad_sums(const NormRows& t) {
  over_channels(t, [&](int64_t c, int64_t count) {
    const vec a = load_part(t.scale + c, count), b = load_part(t.shift + c, count);
    vec s{}, s2{};
    for (int64_t r = 0; r < t.rows; ++r) {
      const vec x = load_part(t.x + r * t.channels + c, count);
      const vec dz = silu_grad(load_part(t.dy + r * t.channels + c, count), x * a + b);
      store_part(t.out + r * t.channels + c, dz, count);
      s += dz;
      s2 += dz * x;
    }
    store_part(t.sum + c, load_part(t.sum + c, count) + s, count);
    store_part(t.sum2 + c, load_part(t.sum2 + c, count) + s2, count);
  });
}

// out[r][c] = scale[c] * dz + ga[c] * x + gb[c], in place over the dz that out holds; with sum,
// sum[c] += out[r][c] over the rows.
void norm_silu_grad(const NormRows& t) {
  over_channels(t, [&](int64_t c, int64_t count) {
    const vec a = load_part(t.scale + c, count), ga = load_part(t.ga + c, count), gb = load_part(t.gb + c, count);
    vec total{};
    for (int64_t r = 0; r < t.rows; ++r) {
      float* out = t.out + r * t.channels + c;
      const vec dx = a * load_part(out, count) + ga * load_part(t.x + r * t.channels + c, count) + gb;
      store_part(out, dx, count);
      total += dx;
    }
    if (t.sum) store_part(t.sum + c, load_part(t.sum + c, count) + total, count);
  });
}

}  // namespace SK_ISA
}  // namespace cpu
}  // namespace sparse_kernels
