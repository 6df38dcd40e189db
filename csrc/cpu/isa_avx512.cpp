// The CPU kernels' inner loops for AVX-512F: 32 vector registers of 16 floats.
#include <cstdint>

#include "isa.h"

#if SPARSE_KERNELS_X86_ISAS
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define SK_ISA avx512
#define SK_VW 16
#define SK_ACC 24
#include "microkernels.h"
#include "microkernels_vector.h"
#include "microkernels_norm.h"
#endif
