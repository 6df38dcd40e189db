// Shared by the CPU and CUDA mask-update kernels: how scores become selection keys.
//
// A selection picks the k candidates with the smallest 64-bit composite key
//   (ordered score << 32) | flat block index,
// which is unique per block, so "the k smallest" is one well-defined set on every
// device: ties in score go to the lower flat block index, bit for bit alike.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace sparse_kernels {

// Keys of non-finite drop scores: after every finite score (dropped last).
constexpr uint32_t kWorstKey = 0xFFFFFFFFu;

SK_HOST_DEVICE uint32_t float_bits(float s) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(s);
#else
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  return bits;
#endif
}

// Exponent bits all ones means inf or nan.
SK_HOST_DEVICE bool finite_score(float s) { return (float_bits(s) & 0x7F800000u) != 0x7F800000u; }

// Monotone map of a finite float to uint32: a < b  <=>  key(a) < key(b); -0 == +0.
SK_HOST_DEVICE uint32_t ordered_key(float s) {
  const uint32_t bits = float_bits(s + 0.0f);  // -0.0 + 0.0 == +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Drop: smallest score first; non-finite scores last.
SK_HOST_DEVICE uint64_t drop_key(float score, uint32_t flat) {
  uint32_t key = finite_score(score) ? ordered_key(score) : kWorstKey;
  return (static_cast<uint64_t>(key) << 32) | flat;
}

// Grow: largest score first (only finite scores are candidates among the dead blocks).
SK_HOST_DEVICE uint64_t grow_key(float score, uint32_t flat) {
  return (static_cast<uint64_t>(ordered_key(-score)) << 32) | flat;
}

// Grow key of a block just dropped (a candidate when dropped blocks may be regrown): as
// grow_key, but a non-finite score ranks after every finite one instead of excluding the
// block, so that k candidates always exist and nnz never changes.
SK_HOST_DEVICE uint64_t regrow_key(float score, uint32_t flat) {
  return finite_score(score) ? grow_key(score, flat) : (static_cast<uint64_t>(kWorstKey) << 32) | flat;
}

}  // namespace sparse_kernels
