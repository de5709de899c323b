// Host emulation of the CUDA execution model, force-included (g++ -include emu.h) in front of the
// real csrc/cuda/*.cu sources; see tests/test_cuda_emulated.py for the approach and its limits.
//
// A launch runs its blocks one after another. The threads of a block are fibers on the calling OS
// thread (each started once by setcontext, then switched with _setjmp / _longjmp, which, unlike
// swapcontext, make no system call: swapcontext's signal-mask calls were 40 % of the run time),
// switched only where a CUDA thread would wait for others:
//   __syncthreads / __syncthreads_or  every live thread of the block must arrive (else: abort);
//   __shfl_xor_sync / __shfl_down_sync all 32 lanes of the warp must arrive (full mask only).
// Between those points a fiber runs alone, so a block's shared memory (the kernels' `__shared__`
// arrays, made function-`static` by the generator) has no data races of its own: the emulation
// checks the barrier structure and the arithmetic, not the memory model. (std::threads with a
// std::barrier, the first prototype, spent ~2 s of futex waits per 256-thread row.)
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <setjmp.h>
#include <ucontext.h>
// (no C++ library headers: <mutex> and <memory> alone took 2 s of each translation unit's build)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)

struct EmuDim {
  unsigned x = 1, y = 1, z = 1;
};
inline EmuDim threadIdx, blockIdx, blockDim, gridDim;

// Fast-math intrinsics: the libm functions (the hardware's approximations round differently).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// Atomics: a fiber runs alone between barriers, so a plain read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;
enum State : unsigned char { kRun, kBlockWait, kWarpWait, kDone };

struct Block {
  jmp_buf sched;
  jmp_buf jb[kMaxThreads];
  bool started[kMaxThreads];
  ucontext_t ctx[kMaxThreads];
  State state[kMaxThreads];
  // exchange slots, double-buffered: a slot is rewritten only after a later barrier of the same
  // kind, which every reader of its previous value has passed
  uint64_t warp_slot[2][kMaxThreads];
  int warp_phase[kMaxThreads];
  int block_slot[2][kMaxThreads];
  int block_phase[kMaxThreads];
  unsigned n = 0;
  int cur = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  char* stacks = nullptr;  // kMaxThreads stacks of kStack bytes, allocated once, never freed
};

// One launch at a time (from any OS thread): the block state and the kernels' static scratch
// arrays are shared.
inline pthread_mutex_t launch_lock = PTHREAD_MUTEX_INITIALIZER;

inline Block& blk() {
  static Block b;
  return b;
}

[[noreturn]] inline void die(const char* what) {
  fprintf(stderr, "cuda emulation: %s (block %u)\n", what, blockIdx.x);
  fflush(stderr);
  abort();
}

inline void wait(State s) {
  Block& b = blk();
  const int me = b.cur;
  b.state[me] = s;
  if (!_setjmp(b.jb[me])) _longjmp(b.sched, 1);
  threadIdx.x = unsigned(me);  // restored by the scheduler as well; kept explicit
}

inline void trampoline() {
  Block& b = blk();
  b.body(b.arg);
  b.state[b.cur] = kDone;
  _longjmp(b.sched, 1);  // never returns: the fiber's stack is left as it is
}

// Runs thread t until it waits or ends (back here through b.sched); out of line, so that no
// local of the scheduler's loop lives across the jump
__attribute__((noinline)) inline void enter(Block& b, unsigned t) {
  if (!_setjmp(b.sched)) {
    if (!b.started[t]) {
      b.started[t] = true;
      setcontext(&b.ctx[t]);
    }
    _longjmp(b.jb[t], 1);
  }
}

// Runs one block of `n` threads to completion.
inline void run_block(unsigned n) {
  Block& b = blk();
  if (n == 0 || n > unsigned(kMaxThreads) || n % 32 != 0) die("block size must be 32..1024, x32");
  if (b.stacks == nullptr) b.stacks = new char[kStack * kMaxThreads];
  b.n = n;
  for (unsigned t = 0; t < n; ++t) {
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = b.stacks + kStack * t;
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = nullptr;
    b.started[t] = false;
    makecontext(&b.ctx[t], trampoline, 0);
    b.state[t] = kRun;
    b.warp_phase[t] = b.block_phase[t] = 0;
  }
  for (;;) {
    bool ran = false;
    for (unsigned t = 0; t < n; ++t) {
      if (b.state[t] != kRun) continue;
      ran = true;
      b.cur = int(t);
      threadIdx.x = t;
      enter(b, t);
    }
    // release the warps whose 32 lanes all wait at a shuffle
    bool released = false;
    for (unsigned w = 0; w < n / 32; ++w) {
      int waiting = 0, done = 0;
      for (unsigned l = 0; l < 32; ++l) {
        waiting += b.state[w * 32 + l] == kWarpWait;
        done += b.state[w * 32 + l] == kDone;
      }
      if (waiting == 32) {
        for (unsigned l = 0; l < 32; ++l) b.state[w * 32 + l] = kRun;
        released = true;
      } else if (waiting > 0 && waiting + done == 32) {
        die("a warp shuffle that not every lane of the warp reached");
      }
    }
    if (released) continue;
    unsigned waiting = 0, done = 0;
    for (unsigned t = 0; t < n; ++t) {
      waiting += b.state[t] == kBlockWait;
      done += b.state[t] == kDone;
    }
    if (done == n) return;
    if (waiting > 0 && waiting + done == n) {
      if (done > 0) die("__syncthreads reached by only part of the block (others exited)");
      for (unsigned t = 0; t < n; ++t) b.state[t] = kRun;
      continue;
    }
    if (!ran) die("deadlock: threads wait at different barriers");
  }
}

template <class F>
void call_body(void* f) {
  (*static_cast<F*>(f))();
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::kBlockWait); }

inline int __syncthreads_or(int pred) {
  emu::Block& b = emu::blk();
  const int me = b.cur, ph = b.block_phase[me];
  b.block_phase[me] = ph ^ 1;
  b.block_slot[ph][me] = pred != 0;
  emu::wait(emu::kBlockWait);
  int any = 0;
  for (unsigned t = 0; t < b.n; ++t) any |= b.block_slot[ph][t];
  return any;
}

template <class T>
inline T emu_shfl(unsigned mask, T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
  if (mask != 0xffffffffu) emu::die("only full-warp shuffle masks are emulated");
  emu::Block& b = emu::blk();
  const int me = b.cur, ph = b.warp_phase[me];
  b.warp_phase[me] = ph ^ 1;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  b.warp_slot[ph][me] = bits;
  emu::wait(emu::kWarpWait);
  const unsigned src = (unsigned(me) & ~31u) | (src_lane & 31u);
  T r;
  memcpy(&r, &b.warp_slot[ph][src], sizeof(T));
  return r;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu_shfl(mask, v, (threadIdx.x & 31u) ^ unsigned(lane_mask));
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const unsigned lane = threadIdx.x & 31u;
  return emu_shfl(mask, v, lane + delta < 32 ? lane + delta : lane);
}

// kernel<<<grid, block, 0, stream>>>(args) becomes emu_launch(grid, block, [&] { kernel(args); }).
template <class F>
inline void emu_launch(unsigned grid, unsigned block, F f) {
  pthread_mutex_lock(&emu::launch_lock);
  emu::Block& b = emu::blk();
  b.body = &emu::call_body<F>;
  b.arg = &f;
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned i = 0; i < grid; ++i) {
    blockIdx.x = i;
    emu::run_block(block);
  }
  pthread_mutex_unlock(&emu::launch_lock);
}
