// The CPU kernels' inner loops for AVX2 and FMA (x86-64 since 2013): 16 vector registers of 8 floats.
#include <cstdint>

#include "isa.h"

#if SPARSE_KERNELS_X86_ISAS
#pragma GCC target("avx2,fma")
#define SK_ISA avx2
#define SK_VW 8
#define SK_MR 6
#define SK_MO 4
#define SK_REGISTERS 16
#include "microkernels.h"

namespace sparse_kernels {
namespace cpu {
namespace avx2 {
extern const int64_t rows_per_tile = SK_MR;
}  // namespace avx2
}  // namespace cpu
}  // namespace sparse_kernels
#endif
