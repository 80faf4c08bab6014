// cuda_emu.h: run CUDA C++ kernel source, unchanged, on the CPU (test harness only).
//
// A CUDA source is compiled by the host C++ compiler after this header (g++ >= 12, -std=c++20
// -fno-extern-tls-init -pthread; why the TLS flag: tree_attention_emu.cpp).
// Each CUDA thread of a block is a fiber (a user-level context with its own stack); a block's
// fibers run cooperatively on one OS thread and switch only at synchronisation points:
//   * __syncthreads() is a real barrier over the block's threads,
//   * warp shuffles / votes / __syncwarp are real barriers over the 32 lanes of the warp, with the
//     values exchanged through a per-warp buffer (full-warp masks only; anything else is reported),
// so every thread keeps its own registers across the barrier exactly as on a GPU. The order in
// which a block's threads run between barriers is a seeded random permutation, so a missing
// barrier shows up as a wrong result instead of being hidden by a friendly schedule. Deadlocks
// (a barrier some threads never reach: divergent __syncthreads, a shuffle not executed by the
// whole warp, threads exiting while others wait) are detected and reported, not hung on.
//
// Blocks are independent: they are spread over a few OS threads (workers), each running one block
// at a time. `__shared__` is `thread_local`, i.e. per worker = per resident block; the dynamic
// shared memory (`extern __shared__ T buf[]`) is one thread_local array per worker that the
// caller defines and hands to launch() (see launch()), poisoned with NaN bytes (0xff) before every
// block so that reading shared memory the block has not written shows up.
//
// Fibers switch through a few lines of x86-64 assembly (about 10x faster than swapcontext, which
// makes a system call per switch); other architectures, or -DCUDA_EMU_UCONTEXT, use ucontext.
//
// Not modelled: memory spaces other than "host memory" (every pointer is a host pointer, so an
// out-of-bounds global access is silent or a segfault, never a CUDA error), poisoning of static
// `__shared__` arrays (only the dynamic shared memory is poisoned), warp shuffles with partial
// masks (reported as errors), intra-warp lockstep between sync points, atomics, timing.
#pragma once

#if !defined(__x86_64__) || defined(CUDA_EMU_UCONTEXT)
#include <ucontext.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------- keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local  // one OS thread runs one block at a time (see above)
#define __constant__
#define __managed__

// ---------------------------------------------------------------------------------- vector types

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---------------------------------------------------------------------------------- intrinsics

using std::max;
using std::min;
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------------- runtime

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;
};

// ---- execution contexts: a small hand-written switch on x86-64 (swapcontext makes a system call
// per switch, which is most of the run time), ucontext elsewhere or with -DCUDA_EMU_UCONTEXT.
#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
// cuda_emu_switch(&from_sp, to_sp): push the callee-saved registers, MXCSR and the x87 control
// word on the current stack, save its pointer, load `to_sp` and pop the same frame from it.
asm(R"(
  .pushsection .text
  .weak cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
  .popsection
)");
extern "C" void cuda_emu_switch(void** from_sp, void* to_sp);

struct Context {
  void* sp = nullptr;
};
// A fresh context that starts in entry() (which must never return) on the given stack.
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                  // entry's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(entry);  // where cuda_emu_switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  --sp;
  std::memcpy(sp, csr, 8);  // the creating thread's floating-point modes
  c.sp = sp;
}
inline void context_switch(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
[[noreturn]] inline void context_jump(Context& to) {
  void* discarded;
  cuda_emu_switch(&discarded, to.sp);
  __builtin_unreachable();
}
#else
struct Context {
  ucontext_t uc;
};
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
[[noreturn]] inline void context_jump(Context& to) {
  setcontext(&to.uc);
  __builtin_unreachable();
}
#endif

struct Fiber {
  Context context;
  unsigned tid = 0;
  bool finished = false;
  const Barrier* waiting = nullptr;  // blocked on this barrier ...
  unsigned waiting_generation = 0;   // ... until its generation moves past this one
  unsigned exchange_parity = 0;      // which half of the warp's exchange buffer is next
  const char* waiting_at = "";       // for deadlock reports
};

struct Worker;

// Per-OS-thread state: the block being run and the fiber running now.
inline thread_local Worker* t_worker = nullptr;
inline thread_local Fiber* t_fiber = nullptr;

}  // namespace cuda_emu

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emu {

struct Worker {
  Context home;  // the worker's own context (block scheduler)
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  std::vector<int> order;   // a random permutation of the block's threads: run order
  std::vector<int> slot;    // slot[tid] = position of tid in `order`
  int num_threads = 0;
  int live = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // [warps][2][32]
  void (*invoke)(const void*) = nullptr;  // runs the kernel body for the current thread
  const void* body = nullptr;
  std::string error;  // set when the block failed (deadlock, unsupported use)

  ~Worker() {
    for (char* s : stacks) munmap(s, kStackBytes);
  }

  void ensure(int threads) {
    if (static_cast<int>(fibers.size()) >= threads) return;
    const long page = sysconf(_SC_PAGESIZE);
    while (static_cast<int>(stacks.size()) < threads) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      stacks.push_back(static_cast<char*>(p));
    }
    fibers.resize(threads);
  }
};

// Switch from the current fiber to the next runnable one in run order (or back home when every
// thread has finished, or on deadlock). Returns when the current fiber is resumed.
inline void switch_away(bool finished) {
  Worker& w = *t_worker;
  Fiber* self = t_fiber;
  const int n = w.num_threads;
  const int start = w.slot[self->tid];
  for (int step = 1; step <= n; ++step) {
    Fiber& f = w.fibers[w.order[(start + step) % n]];
    if (f.finished) continue;
    if (f.waiting && f.waiting->generation == f.waiting_generation) continue;
    if (&f == self) return;  // the only runnable thread is this one: keep going
    f.waiting = nullptr;
    t_fiber = &f;
    threadIdx = uint3{f.tid % blockDim.x, (f.tid / blockDim.x) % blockDim.y,
                      f.tid / (blockDim.x * blockDim.y)};
    if (finished) context_jump(f.context);
    context_switch(self->context, f.context);
    return;
  }
  // Nothing runnable.
  if (w.live > 0 && w.error.empty()) {
    std::string msg = "deadlock in block (" + std::to_string(blockIdx.x) + "," +
                      std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "): " +
                      std::to_string(w.live) + " of " + std::to_string(n) +
                      " threads wait forever (";
    int shown = 0;
    for (const Fiber& f : w.fibers) {
      if (f.finished || shown >= 4) continue;
      msg += (shown++ ? ", " : "") + std::string("thread ") + std::to_string(f.tid) + " at " +
             f.waiting_at;
    }
    msg += "); " + std::to_string(n - w.live) + " threads have exited";
    w.error = msg;
  }
  if (finished) context_jump(w.home);
  context_switch(self->context, w.home);
}

inline void arrive_and_wait(Barrier& b, const char* where) {
  Fiber* self = t_fiber;
  if (++b.arrived == b.expected) {  // the last one in releases everybody and keeps running
    b.arrived = 0;
    ++b.generation;
    return;
  }
  self->waiting = &b;
  self->waiting_generation = b.generation;
  self->waiting_at = where;
  switch_away(false);
  self->waiting_at = "";
}

inline void fiber_entry() {
  Worker& w = *t_worker;
  w.invoke(w.body);
  t_fiber->finished = true;
  --w.live;
  switch_away(true);  // never comes back
  __builtin_unreachable();
}

[[noreturn]] inline void fail_current(const std::string& message) {
  Worker& w = *t_worker;
  if (w.error.empty()) {
    w.error = message + " (block " + std::to_string(blockIdx.x) + "," +
              std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ", thread " +
              std::to_string(t_fiber->tid) + ")";
  }
  context_jump(w.home);  // abandon the block; its fibers are restarted from scratch next time
}

// Warp-level exchange: every lane deposits `value`, waits for the whole warp, reads lane `src`.
inline uint64_t warp_exchange(unsigned mask, uint64_t value, int src, const char* what) {
  Worker& w = *t_worker;
  Fiber* self = t_fiber;
  const unsigned tid = self->tid;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int lanes = std::min(kWarpSize, w.num_threads - warp * kWarpSize);
  const unsigned full = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) {
    fail_current(std::string(what) + ": mask " + std::to_string(mask) +
                 " is not the full warp (the emulator supports full-warp masks only)");
  }
  uint64_t* buf = &w.exchange[(warp * 2 + self->exchange_parity) * kWarpSize];
  self->exchange_parity ^= 1u;
  buf[lane] = value;
  // One barrier per exchange: the other half of the buffer is written next time, and nobody can
  // write this half again before everybody has passed the next barrier (i.e. read this one).
  arrive_and_wait(w.warp_barriers[warp], what);
  if (src < 0 || src >= lanes) src = lane;  // out-of-range source lanes read their own value
  return buf[src];
}

inline uint64_t warp_ballot_bits(unsigned mask, bool predicate, const char* what) {
  Worker& w = *t_worker;
  Fiber* self = t_fiber;
  const int warp = self->tid / kWarpSize;
  const int lanes = std::min(kWarpSize, w.num_threads - warp * kWarpSize);
  // exchange the predicate, then read every lane's (same buffer half, already complete)
  warp_exchange(mask, predicate ? 1u : 0u, 0, what);
  const uint64_t* buf = &w.exchange[(warp * 2 + (self->exchange_parity ^ 1u)) * kWarpSize];
  uint64_t bits = 0;
  for (int l = 0; l < lanes; ++l) bits |= (buf[l] & 1u) << l;
  return bits;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a value > 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
inline std::string& last_error() {
  static std::string e;
  return e;
}

// Run `body` (which calls the kernel) for every thread of every block of `grid` x `block`.
// `dynamic_smem()` returns the calling OS thread's dynamic shared memory array of
// `dynamic_smem_capacity` bytes (a thread_local the caller defines where the kernel's
// `extern __shared__` declaration resolves). Returns 0, or -1 with last_error() set.
template <typename Body>
int launch(dim3 grid, dim3 block, size_t shared_bytes, void* (*dynamic_smem)(),
           size_t dynamic_smem_capacity, const Body& body, unsigned seed = 0,
           int max_workers = 0) {
  const long long threads = 1LL * block.x * block.y * block.z;
  const long long blocks = 1LL * grid.x * grid.y * grid.z;
  {
    std::lock_guard<std::mutex> lock(error_mutex());
    last_error().clear();
  }
  if (threads < 1 || threads > kMaxThreads || blocks < 1) {
    last_error() = "bad launch configuration: " + std::to_string(blocks) + " blocks of " +
                   std::to_string(threads) + " threads";
    return -1;
  }
  if (shared_bytes > dynamic_smem_capacity) {
    last_error() = "dynamic shared memory " + std::to_string(shared_bytes) +
                   " B exceeds the emulator's " + std::to_string(dynamic_smem_capacity) + " B";
    return -1;
  }
  int workers = max_workers;
  if (workers <= 0) workers = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  workers = static_cast<int>(std::min<long long>(std::min(workers, 16), blocks));
  std::atomic<long long> next{0};
  std::atomic<bool> failed{false};

  auto run = [&] {
    Worker w;
    t_worker = &w;
    const int n = static_cast<int>(threads);
    const int warps = (n + kWarpSize - 1) / kWarpSize;
    w.ensure(n);
    w.num_threads = n;
    w.order.resize(n);
    w.slot.resize(n);
    w.warp_barriers.assign(warps, Barrier{});
    w.exchange.assign(static_cast<size_t>(warps) * 2 * kWarpSize, 0);
    w.invoke = [](const void* b) { (*static_cast<const Body*>(b))(); };
    w.body = &body;
    blockDim = block;
    gridDim = grid;
    unsigned char* smem = static_cast<unsigned char*>(dynamic_smem());
    for (long long linear; !failed.load() && (linear = next.fetch_add(1)) < blocks;) {
      blockIdx = uint3{static_cast<unsigned>(linear % grid.x),
                       static_cast<unsigned>((linear / grid.x) % grid.y),
                       static_cast<unsigned>(linear / (1LL * grid.x * grid.y))};
      std::memset(smem, 0xff, dynamic_smem_capacity);  // NaN / all-ones until written
      // run order: a Fisher-Yates shuffle driven by splitmix64(seed, block)
      uint64_t state = (uint64_t{seed} << 32) ^ static_cast<uint64_t>(linear);
      auto next_random = [&state] {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
      };
      for (int i = 0; i < n; ++i) w.order[i] = i;
      for (int i = n - 1; i > 0; --i) std::swap(w.order[i], w.order[next_random() % (i + 1)]);
      for (int i = 0; i < n; ++i) w.slot[w.order[i]] = i;
      w.block_barrier = Barrier{n, 0, 0};
      for (int i = 0; i < warps; ++i) {
        w.warp_barriers[i] = Barrier{std::min(kWarpSize, n - i * kWarpSize), 0, 0};
      }
      w.live = n;
      w.error.clear();
      for (int i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        f.tid = i;
        f.finished = false;
        f.waiting = nullptr;
        f.exchange_parity = 0;
        context_init(f.context, w.stacks[i], kStackBytes, fiber_entry);
      }
      Fiber& first = w.fibers[w.order[0]];
      t_fiber = &first;
      threadIdx = uint3{first.tid % block.x, (first.tid / block.x) % block.y,
                        first.tid / (block.x * block.y)};
      context_switch(w.home, first.context);  // back here when the block is done or failed
      if (!w.error.empty()) {
        std::lock_guard<std::mutex> lock(error_mutex());
        if (last_error().empty()) last_error() = w.error;
        failed.store(true);
      }
    }
    t_worker = nullptr;
    t_fiber = nullptr;
  };

  std::vector<std::thread> pool;
  for (int i = 1; i < workers; ++i) pool.emplace_back(run);
  run();
  for (auto& t : pool) t.join();
  return failed.load() ? -1 : 0;
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------- sync / warp

inline void __syncthreads() {
  cuda_emu::arrive_and_wait(cuda_emu::t_worker->block_barrier, "__syncthreads");
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::warp_exchange(mask, 0, 0, "__syncwarp");
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int lane = cuda_emu::t_fiber->tid % 32;
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return cuda_emu::from_bits<T>(
      cuda_emu::warp_exchange(mask, cuda_emu::to_bits(var), src, "__shfl_sync"));
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = cuda_emu::t_fiber->tid % 32;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment
  return cuda_emu::from_bits<T>(
      cuda_emu::warp_exchange(mask, cuda_emu::to_bits(var), src, "__shfl_xor_sync"));
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = cuda_emu::t_fiber->tid % 32;
  int src = lane - static_cast<int>(delta);
  if (src < (lane & ~(width - 1))) src = lane;
  return cuda_emu::from_bits<T>(
      cuda_emu::warp_exchange(mask, cuda_emu::to_bits(var), src, "__shfl_up_sync"));
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = cuda_emu::t_fiber->tid % 32;
  int src = lane + static_cast<int>(delta);
  if (src >= (lane & ~(width - 1)) + width) src = lane;
  return cuda_emu::from_bits<T>(
      cuda_emu::warp_exchange(mask, cuda_emu::to_bits(var), src, "__shfl_down_sync"));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(cuda_emu::warp_ballot_bits(mask, predicate != 0, "__ballot_sync"));
}
inline int __any_sync(unsigned mask, int predicate) {
  return cuda_emu::warp_ballot_bits(mask, predicate != 0, "__any_sync") != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return cuda_emu::warp_ballot_bits(mask, predicate != 0, "__all_sync") == mask;
}
