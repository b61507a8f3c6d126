// A host emulation of the CUDA execution model, enough to run mpq's packed kernels
// (csrc/cuda/packed_kernels.cuh) on the CPU: every thread of a CTA is a fiber (ucontext) on one OS
// thread, CTAs run one after another, __syncthreads is a barrier of the CTA's fibers, __shared__
// arrays are static (one CTA at a time), and mma.sync is a warp collective that gathers the 32
// lanes' registers and computes each lane's outputs from the PTX ISA's fragment tables for
// mma.m16n8k16 (f16, bf16) and mma.m16n8k32 (s8), written here independently of the kernels'
// layout code (csrc/kernels/packed_layout.h). fp16/bf16 arithmetic rounds like the hardware's
// (c10::Half / c10::BFloat16, round to nearest even); mma sums products in double and rounds the
// accumulator to float once per instruction (hardware: exact products, >= fp32 sums).
//
// Warp shuffles (__shfl_xor_sync, __shfl_up_sync with a full mask) are warp collectives too, and
// dynamic shared memory is a buffer of launch()'s size. Include torch headers first, then this, then
// the kernel header. Not a general CUDA emulator: no streams, atomics, partial-mask shuffles or
// asynchronous copies (mpq's kernels use none). Under AddressSanitizer (-fsanitize=address) the
// fiber switches are announced to it, so that the kernels' out-of-bounds accesses are reported
// (the host analogue of compute-sanitizer's memcheck).
//
// What the device would do to a wrong kernel, done here too:
// - __ldg of 2, 4, 8 or 16 bytes (uint4 is 16-byte aligned, as CUDA's) from an address that is not
//   a multiple of its size aborts with the address, as the GPU's misaligned address error does.
//   Plain loads and stores through typed pointers are checked by -fsanitize=alignment where the
//   test is built with it (tests/cpp/CMakeLists.txt).
// - Shared memory, static (MPQ_SHARED of csrc/cuda/shared_memory.cuh: registered when a thread first
//   reaches its declaration) and dynamic, is filled with 0xFF bytes (NaN in every float type, -1 in
//   every integer type) before every CTA and at its registration: a value read before it is written
//   in the same CTA is garbage, not the previous CTA's nor zero. A plain __shared__ does not compile
//   here (GCC ignores a section attribute on the static locals of templates, so a registry it is).
// - FMA: nvcc contracts a * b + c into one fused multiply-add by default (--fmad=true); the test
//   compiles the kernels with -ffp-contract=fast (and FMA instructions, tests/cpp/CMakeLists.txt),
//   so that a kernel that depends on a product being rounded before a sum fails here too. The
//   correctly rounded intrinsics (__fmul_rn, __fadd_rn, ...) are never contracted, on the GPU and
//   here (their operands and result pass through opaque()).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#define MPQ_SIMT_EMULATION 1
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Kernels declare shared memory with MPQ_SHARED / MPQ_DYNAMIC_SHARED (csrc/cuda/shared_memory.cuh).
#define __shared__ mpq_simt_emulation_needs_MPQ_SHARED_instead_of___shared__
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) double2 {  // as CUDA's
  double x, y;
};
inline double2 make_double2(double x, double y) { return {x, y}; }

using std::isfinite;
using std::isnan;
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
namespace mpq_simt {
// A misaligned access is an error on the GPU ("misaligned address"); on x86 it would just work.
[[noreturn]] inline void misaligned(const void* p, size_t bytes) {
  std::fprintf(stderr, "simt_emulator: misaligned %zu-byte access at address %p (not a multiple of %zu)\n", bytes, p,
               bytes);
  std::abort();
}
template <class T>
inline void check_aligned(const T* p) {
  constexpr size_t n = sizeof(T);
  if constexpr (n == 2 || n == 4 || n == 8 || n == 16) {
    if (reinterpret_cast<uintptr_t>(p) % n != 0) misaligned(p, n);
  }
}
// The value through an empty asm statement: the compiler cannot fuse the operation that made it
// with the one that uses it (no FMA contraction across a correctly rounded intrinsic).
template <class T>
inline T opaque(T v) {
  asm volatile("" : "+m"(v));
  return v;
}
}  // namespace mpq_simt

template <class T>
inline T __ldg(const T* p) {
  ::mpq_simt::check_aligned(p);
  return *p;
}
// Correctly rounded IEEE operations, never contracted into an FMA (on the GPU: by definition).
#define MPQ_SIMT_RN(NAME, T, OP) \
  inline T NAME(T a, T b) { return ::mpq_simt::opaque(::mpq_simt::opaque(a) OP ::mpq_simt::opaque(b)); }
MPQ_SIMT_RN(__fdiv_rn, float, /)
MPQ_SIMT_RN(__fadd_rn, float, +)
MPQ_SIMT_RN(__fsub_rn, float, -)
MPQ_SIMT_RN(__fmul_rn, float, *)
MPQ_SIMT_RN(__ddiv_rn, double, /)
MPQ_SIMT_RN(__dsub_rn, double, -)
MPQ_SIMT_RN(__dmul_rn, double, *)
#undef MPQ_SIMT_RN
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "simt_emulator: __trap()\n");
  std::abort();
}

// ---- 16-bit floating types (bit patterns, as the kernels reinterpret them) ---------------------

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "16-bit pairs are one 32-bit register");

inline __half __float2half_rn(float f) {
  const c10::Half h(f);
  return {h.x};
}
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline __half2 __float2half2_rn(float f) { return {__float2half_rn(f), __float2half_rn(f)}; }
inline __half2 __hsub2(__half2 a, __half2 b) {
  return {__float2half_rn(__half2float(a.x) - __half2float(b.x)),
          __float2half_rn(__half2float(a.y) - __half2float(b.y))};
}
inline __half2 __hmul2(__half2 a, __half2 b) {
  return {__float2half_rn(__half2float(a.x) * __half2float(b.x)),
          __float2half_rn(__half2float(a.y) * __half2float(b.y))};
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const c10::BFloat16 b(f);
  return {b.x};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  return static_cast<float>(c10::BFloat16(b.bits, c10::BFloat16::from_bits()));
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return {__float2bfloat16_rn(f), __float2bfloat16_rn(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(__bfloat162float(a.x) - __bfloat162float(b.x)),
          __float2bfloat16_rn(__bfloat162float(a.y) - __bfloat162float(b.y))};
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(__bfloat162float(a.x) * __bfloat162float(b.x)),
          __float2bfloat16_rn(__bfloat162float(a.y) * __bfloat162float(b.y))};
}

namespace mpq_simt {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread_idx;
  bool done = false;
  void* fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
};

// Registers a lane contributes to a warp collective.
struct Slot {
  uint32_t a[4], b[2];
  uint64_t value;  // a shuffled value's bits
};

struct Machine {
  dim3 block_idx, grid_dim, block_dim;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  uint64_t events = 0;  // arrivals, releases, completions: the deadlock detector's clock
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<Slot> slots;
  std::vector<unsigned char> dynamic_shared;
  bool reverse = false;  // run the threads in descending order between barriers (set_reverse_order)
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
};

inline Machine& machine() {
  static Machine m;
  return m;
}

inline const dim3& thread_idx() { return machine().fibers[machine().current].thread_idx; }

// Dynamic shared memory, 16-byte aligned as CUDA's (extern __shared__ __align__(16)).
inline unsigned char* dynamic_shared() {
  auto* p = machine().dynamic_shared.data();
  return p + (16 - reinterpret_cast<uintptr_t>(p) % 16) % 16;
}

constexpr unsigned char kSharedPoison = 0xFF;  // NaN in every float type, -1 in every integer type

// The static shared arrays seen so far (MPQ_SHARED): address and size.
inline std::vector<std::pair<void*, size_t>>& shared_variables() {
  static std::vector<std::pair<void*, size_t>> v;
  return v;
}

// MPQ_SHARED's registration, at every thread's pass over the declaration: poisoned at the first.
inline void shared_variable(void* p, size_t bytes) {
  auto& v = shared_variables();
  for (const auto& [q, n] : v) {
    if (q == p) return;
  }
  v.emplace_back(p, bytes);
  std::memset(p, kSharedPoison, bytes);
}

// Garbage in all shared memory, static and dynamic, as a CTA finds it on the device.
inline void poison_shared(size_t dynamic_bytes) {
  std::memset(dynamic_shared(), kSharedPoison, dynamic_bytes);
  for (const auto& [p, n] : shared_variables()) std::memset(p, kSharedPoison, n);
}

// Stack switches, announced to AddressSanitizer when it is on.
inline void switch_to_scheduler(bool finished) {
  Machine& m = machine();
  Fiber& f = m.fibers[m.current];
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, m.scheduler_stack_bottom, m.scheduler_stack_size);
#else
  (void)finished;
#endif
  swapcontext(&f.context, &m.scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

inline void switch_to_fiber(int i) {
  Machine& m = machine();
  m.current = i;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&m.scheduler_fake_stack, m.fibers[i].stack.get(), kStackBytes);
#endif
  swapcontext(&m.scheduler, &m.fibers[i].context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(m.scheduler_fake_stack, nullptr, nullptr);
#endif
}

inline void yield() { switch_to_scheduler(false); }

// Waits until `count` fibers arrived at this barrier (the CTA's, or one warp's).
inline void barrier(int& arrived, uint64_t& generation, int count) {
  Machine& m = machine();
  const uint64_t gen = generation;
  ++m.events;
  if (++arrived == count) {
    arrived = 0;
    ++generation;
    return;
  }
  while (generation == gen) yield();
}

inline void sync_block() {
  Machine& m = machine();
  barrier(m.block_arrived, m.block_generation, static_cast<int>(m.block_dim.x));
}

inline int lane_id() { return static_cast<int>(thread_idx().x) % kWarpSize; }

inline void sync_warp() {
  Machine& m = machine();
  const int warp = static_cast<int>(thread_idx().x) / kWarpSize;
  barrier(m.warp_arrived[warp], m.warp_generation[warp], kWarpSize);
}

inline void fiber_entry() {
  Machine& m = machine();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &m.scheduler_stack_bottom, &m.scheduler_stack_size);
#endif
  (*m.body)();
  m.fibers[m.current].done = true;
  ++m.events;
  switch_to_scheduler(true);
}

// Runs `body` on every thread of one CTA until all return; aborts on a barrier not every thread reaches.
inline void run_cta(const std::function<void()>& body) {
  Machine& m = machine();
  const int n = static_cast<int>(m.block_dim.x);
  if (n % kWarpSize != 0) {
    std::fprintf(stderr, "simt_emulator: CTAs of whole warps only (got %d threads)\n", n);
    std::abort();
  }
  if (static_cast<int>(m.fibers.size()) < n) m.fibers.resize(n);
  m.body = &body;
  m.block_arrived = 0;
  m.warp_arrived.assign(n / kWarpSize, 0);
  m.warp_generation.assign(n / kWarpSize, 0);
  m.slots.assign(n, Slot{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = m.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.done = false;
    f.thread_idx = dim3(static_cast<unsigned>(i), 0, 0);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (int remaining = n; remaining > 0;) {
    const uint64_t before = m.events;
    remaining = 0;
    for (int k = 0; k < n; ++k) {
      const int i = m.reverse ? n - 1 - k : k;
      if (m.fibers[i].done) continue;
      switch_to_fiber(i);
      remaining += m.fibers[i].done ? 0 : 1;
    }
    if (remaining > 0 && m.events == before) {
      std::fprintf(stderr, "simt_emulator: deadlock: %d threads wait at a barrier the others never reach\n", remaining);
      std::abort();
    }
  }
}

// Threads run one after another between barriers, in ascending order, or descending after
// set_reverse_order(true): a kernel whose outputs differ between the two orders reads what another
// thread writes without a barrier between them (the host analogue of compute-sanitizer's racecheck
// for such pairs).
inline void set_reverse_order(bool reverse) { machine().reverse = reverse; }

// kernel<<<grid, block, shared_bytes>>>(args...), synchronously.
template <class Kernel, class... Args>
void launch_shared(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args) {
  Machine& m = machine();
  m.dynamic_shared.assign(shared_bytes + 16, kSharedPoison);  // + 16: room to align
  m.grid_dim = grid;
  m.block_dim = block;
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        m.block_idx = dim3(x, y, z);
        poison_shared(shared_bytes);
        run_cta(body);
      }
}

// kernel<<<grid, block>>>(args...), synchronously.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  launch_shared(grid, block, 0, kernel, args...);
}

// ---- warp shuffles (all 32 lanes, as the full masks of mpq's kernels) ------------------------------

template <class T>
T shuffle_from(T v, int (*source)(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a register-sized value");
  Machine& m = machine();
  const int lane = lane_id(), base = static_cast<int>(thread_idx().x) - lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  m.slots[base + lane].value = bits;
  sync_warp();
  const int src = source(lane, arg);
  T out = v;
  if (src >= 0 && src < kWarpSize) std::memcpy(&out, &m.slots[base + src].value, sizeof(T));
  sync_warp();
  return out;
}

// ---- mma.sync, from the PTX ISA's fragment tables (lane = 4 g + t) -------------------------------

inline float f16_bits_to_float(uint32_t bits) { return __half2float({static_cast<uint16_t>(bits)}); }
inline float bf16_bits_to_float(uint32_t bits) { return __bfloat162float({static_cast<uint16_t>(bits)}); }

// mma.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: A[m][k] in lane 4 (m % 8) + (k % 8) / 2,
// register (m >= 8) + 2 (k >= 8), half k % 2; B[k][n] in lane 4 n + (k % 8) / 2, register k >= 8,
// half k % 2; C/D[m][n] in lane 4 (m % 8) + n / 2, element 2 (m >= 8) + n % 2.
// Publishes this lane's A and B registers to its warp and waits for all 32 lanes; returns the
// slot index of the warp's lane 0.
inline int publish(const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Machine& m = machine();
  const int lane = lane_id(), base = static_cast<int>(thread_idx().x) - lane;
  Slot& own = m.slots[base + lane];
  std::copy(a, a + 4, own.a);
  own.b[0] = b0;
  own.b[1] = b1;
  sync_warp();
  return base;
}

template <bool kBf16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const Machine& m = machine();
  const int lane = lane_id(), base = publish(a, b0, b1);
  const auto element = [](uint32_t reg, int half) {
    const uint32_t bits = (reg >> (16 * half)) & 0xFFFFu;
    return static_cast<double>(kBf16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits));
  };
  for (int c = 0; c < 4; ++c) {
    const int row = lane / 4 + 8 * (c / 2), col = 2 * (lane % 4) + c % 2;
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) {
      const Slot& sa = m.slots[base + 4 * (row % 8) + (k % 8) / 2];
      const Slot& sb = m.slots[base + 4 * col + (k % 8) / 2];
      sum += element(sa.a[(row >= 8 ? 1 : 0) + 2 * (k >= 8 ? 1 : 0)], k % 2) * element(sb.b[k >= 8 ? 1 : 0], k % 2);
    }
    d[c] = static_cast<float>(static_cast<double>(d[c]) + sum);
  }
  sync_warp();  // every lane has read the slots before any is written again
}

// mma.m16n8k32.row.col.s32.s8.s8.s32: A[m][k] in lane 4 (m % 8) + (k % 16) / 4, register
// (m >= 8) + 2 (k >= 16), byte k % 4; B[k][n] in lane 4 n + (k % 16) / 4, register k >= 16, byte
// k % 4; D as for m16n8k16.
inline void mma_m16n8k32_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const Machine& m = machine();
  const int lane = lane_id(), base = publish(a, b0, b1);
  const auto byte = [](uint32_t reg, int i) {
    return static_cast<int64_t>(static_cast<int8_t>((reg >> (8 * i)) & 0xFFu));
  };
  for (int c = 0; c < 4; ++c) {
    const int row = lane / 4 + 8 * (c / 2), col = 2 * (lane % 4) + c % 2;
    int64_t sum = 0;
    for (int k = 0; k < 32; ++k) {
      const Slot& sa = m.slots[base + 4 * (row % 8) + (k % 16) / 4];
      const Slot& sb = m.slots[base + 4 * col + (k % 16) / 4];
      sum += byte(sa.a[(row >= 8 ? 1 : 0) + 2 * (k >= 16 ? 1 : 0)], k % 4) * byte(sb.b[k >= 16 ? 1 : 0], k % 4);
    }
    d[c] = static_cast<int>(static_cast<int64_t>(d[c]) + sum);  // s32 wraps like the hardware's
  }
  sync_warp();
}

}  // namespace mpq_simt

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::mpq_simt::shuffle_from(v, [](int lane, int arg) { return lane ^ arg; }, mask);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) {
  // Lanes below delta keep their own value (PTX shfl.up).
  return ::mpq_simt::shuffle_from(v, [](int lane, int arg) { return lane - arg; }, static_cast<int>(delta));
}

#define threadIdx (::mpq_simt::thread_idx())
#define blockIdx (::mpq_simt::machine().block_idx)
#define gridDim (::mpq_simt::machine().grid_dim)
#define blockDim (::mpq_simt::machine().block_dim)
#define __syncthreads() ::mpq_simt::sync_block()
