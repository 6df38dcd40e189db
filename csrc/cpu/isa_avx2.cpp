// The CPU kernels' inner loops for AVX2 and FMA (x86-64 since 2013): 16 vector registers of 8 floats.
#include <cstdint>

#include "isa.h"

#if SPARSE_KERNELS_X86_ISAS
#pragma GCC target("avx2,fma")
#define SK_ISA avx2
#define SK_VW 8
#define SK_ACC 12
#include "microkernels.h"
#include "microkernels_vector.h"
#include "microkernels_norm.h"
#endif
