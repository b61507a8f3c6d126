// Shared memory declarations of mpq's kernels, in a form the host emulation of the tests
// (tests/cpp/simt_emulator.h) can see: there every static shared array is registered when a thread
// first reaches its declaration, and filled with garbage before every CTA, as the device leaves it.
// A kernel declares
//   MPQ_SHARED(double, red, [64]);   // __shared__ double red[64];
//   MPQ_SHARED(float, best, );       // __shared__ float best;
//   MPQ_DYNAMIC_SHARED(smem);        // extern __shared__ __align__(16) unsigned char smem[];
// (the emulation refuses a plain __shared__, so that no array escapes it).
#pragma once

#if defined(MPQ_SIMT_EMULATION)
#define MPQ_SHARED(T, name, dims) \
  static T name dims;             \
  ::mpq_simt::shared_variable(&name, sizeof(name))
#define MPQ_DYNAMIC_SHARED(name) unsigned char* name = ::mpq_simt::dynamic_shared()
#else
#define MPQ_SHARED(T, name, dims) __shared__ T name dims
#define MPQ_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
