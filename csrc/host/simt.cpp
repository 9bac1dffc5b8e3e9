// The runtime of the SIMT execution layer (see simt.h): fibers, the block barrier, the warp exchange,
// the launch checks, and the count of the bytes each launch loads and stores.
//
// The kernels are compiled with -fsanitize=thread but linked without ThreadSanitizer's runtime, so
// every load and store they make calls the __tsan_* hooks defined here. A hook counts the bytes of
// the buffers the caller registered (each byte once per launch, as DRAM traffic is counted), and
// reports an access that falls in the guard bytes around a buffer (out of bounds) or a store into
// a buffer registered read-only. Accesses elsewhere (stacks, shared memory) are not traffic.
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "simt.h"

namespace acn::simt {
namespace {

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr long long kMaxGridX = 2147483647LL;
constexpr std::size_t kDefaultSharedLimit = 48 * 1024;  // without cudaFuncSetAttribute
constexpr std::size_t kMaxErrors = 20;

enum class State { kReady, kAtBarrier, kAtShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 index;
  unsigned lane = 0, warp = 0;
  State state = State::kReady;
};

struct Warp {
  unsigned arrived = 0, mask = 0, published_mask = 0;
  std::uint32_t values[32] = {}, published[32] = {};
};

struct Buffer {
  std::string name;
  std::uintptr_t begin, end, guard;
  bool writable;
  std::vector<unsigned char> read, written;
  int widest_read = 0, widest_write = 0;  // this launch's widest access
};

struct LaunchRecord {
  std::string name;
  long long grid;
  unsigned block;
  std::size_t shared;
  long long bytes_read = 0, bytes_written = 0;
  std::string widths;  // "buffer:widest load:widest store" for each buffer the launch touched
};

struct Runtime {
  // The launch being run.
  const char* name = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 grid, block;
  uint3 block_index;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
  unsigned live = 0, at_barrier = 0, exited = 0;
  bool barrier_error = false;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  // What the caller set up and reads back.
  int opt_in_limit = 227 * 1024;  // the most dynamic shared memory one block may opt in to (acn_simt_set_target)
  std::map<const void*, int> shared_opt_in;
  std::vector<Buffer> buffers;
  std::vector<LaunchRecord> launches;
  std::vector<std::string> errors;
  std::size_t dropped_errors = 0;
  bool counting = false;
};

Runtime rt;

void yield_to_scheduler() { swapcontext(&rt.current->context, &rt.scheduler); }

void release_barrier() {
  if (rt.exited > 0 && !rt.barrier_error) {
    rt.barrier_error = true;
    record_error("%s: __syncthreads() in block %u was reached by %u threads after %u threads of the block had exited",
                 rt.name, rt.block_index.x, rt.at_barrier, rt.exited);
  }
  for (Fiber& f : rt.fibers)
    if (f.state == State::kAtBarrier) f.state = State::kReady;
  rt.at_barrier = 0;
}

void fiber_main() {
  (*rt.body)();
  rt.current->state = State::kDone;
  --rt.live;
  ++rt.exited;
  if (rt.at_barrier > 0 && rt.at_barrier == rt.live) release_barrier();
  // Returning resumes the scheduler (uc_link).
}

// Lanes that exist in warp `warp` of a block of `threads` threads.
unsigned existing_lanes(unsigned warp, unsigned threads) {
  const unsigned lanes = std::min(32u, threads - warp * 32);
  return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
}

std::string deadlock_description() {
  unsigned barrier = 0, shuffle = 0;
  for (const Fiber& f : rt.fibers) {
    barrier += f.state == State::kAtBarrier;
    shuffle += f.state == State::kAtShuffle;
  }
  char text[200];
  std::snprintf(text, sizeof text, "%u threads wait at __syncthreads, %u at a shuffle, %u have exited", barrier,
                shuffle, rt.exited);
  return text;
}

void run_block(unsigned threads) {
  rt.live = threads, rt.at_barrier = 0, rt.exited = 0;
  for (Warp& w : rt.warps) w = Warp{};
  std::fill(rt.shared.begin(), rt.shared.end(), 0xff);  // NaN in every float
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = rt.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &rt.scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.index = {t % rt.block.x, (t / rt.block.x) % rt.block.y, t / (rt.block.x * rt.block.y)};
    f.lane = t % 32, f.warp = t / 32, f.state = State::kReady;
  }
  while (rt.live > 0) {
    bool ran = false;
    for (unsigned t = 0; t < threads; ++t) {
      if (rt.fibers[t].state != State::kReady) continue;
      rt.current = &rt.fibers[t];
      swapcontext(&rt.scheduler, &rt.current->context);
      ran = true;
    }
    if (!ran) {
      record_error("%s: deadlock in block %u: %s", rt.name, rt.block_index.x, deadlock_description().c_str());
      return;
    }
  }
}

void check_access(const void* address, std::size_t size, bool write) {
  if (!rt.counting) return;
  const auto a = reinterpret_cast<std::uintptr_t>(address);
  for (Buffer& b : rt.buffers) {
    if (a + size <= b.begin - b.guard || a >= b.end + b.guard) continue;
    LaunchRecord& launch = rt.launches.back();
    if (a < b.begin || a + size > b.end) {
      const long long offset = a >= b.begin ? static_cast<long long>(a - b.begin) : -static_cast<long long>(b.begin - a);
      record_error("%s: %s %zu bytes at byte %lld of %s, outside its %zu bytes", launch.name.c_str(),
                   write ? "stores" : "loads", size, offset, b.name.c_str(), static_cast<std::size_t>(b.end - b.begin));
      return;
    }
    if (write && !b.writable) {
      record_error("%s: stores into %s, an input", launch.name.c_str(), b.name.c_str());
      return;
    }
    std::fill_n((write ? b.written : b.read).begin() + (a - b.begin), size, 1);
    int& widest = write ? b.widest_write : b.widest_read;
    widest = std::max(widest, static_cast<int>(size));
    return;
  }
}

void finish_counting() {
  LaunchRecord& launch = rt.launches.back();
  for (Buffer& b : rt.buffers) {
    launch.bytes_read += std::count(b.read.begin(), b.read.end(), 1);
    launch.bytes_written += std::count(b.written.begin(), b.written.end(), 1);
    if (b.widest_read || b.widest_write)
      launch.widths += b.name + ":" + std::to_string(b.widest_read) + ":" + std::to_string(b.widest_write) + " ";
    b.widest_read = b.widest_write = 0;
    std::fill(b.read.begin(), b.read.end(), 0);
    std::fill(b.written.begin(), b.written.end(), 0);
  }
}

bool check_launch(const void* kernel, long long grid, unsigned block, std::size_t shared_bytes) {
  if (grid < 1 || grid > kMaxGridX) {
    record_error("%s: grid of %lld blocks, CUDA allows 1 to %lld", rt.name, grid, kMaxGridX);
    return false;
  }
  if (block < 1 || block > kMaxThreads) {
    record_error("%s: block of %u threads, CUDA allows 1 to %u", rt.name, block, kMaxThreads);
    return false;
  }
  const auto opt_in = rt.shared_opt_in.find(kernel);
  const std::size_t limit = opt_in == rt.shared_opt_in.end() ? kDefaultSharedLimit : opt_in->second;
  if (shared_bytes > limit) {
    record_error("%s: %zu bytes of dynamic shared memory, more than the %zu the kernel may use", rt.name,
                 shared_bytes, limit);
    return false;
  }
  return true;
}

}  // namespace

const uint3& thread_index() { return rt.current->index; }
const uint3& block_index() { return rt.block_index; }
const dim3& block_dim() { return rt.block; }
const dim3& grid_dim() { return rt.grid; }
void* dynamic_shared() { return rt.shared.data(); }

void record_error(const char* format, ...) {
  if (rt.errors.size() >= kMaxErrors) {
    ++rt.dropped_errors;
    return;
  }
  char text[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(text, sizeof text, format, args);
  va_end(args);
  rt.errors.emplace_back(text);
}

void sync_threads() {
  Fiber& me = *rt.current;
  me.state = State::kAtBarrier;
  if (++rt.at_barrier == rt.live) release_barrier();
  if (me.state != State::kReady) yield_to_scheduler();
}

std::uint32_t exchange(unsigned mask, std::uint32_t bits, unsigned source, const char* what) {
  Fiber& me = *rt.current;
  Warp& warp = rt.warps[me.warp];
  const unsigned bit = 1u << me.lane, existing = existing_lanes(me.warp, rt.block.x * rt.block.y * rt.block.z);
  if (!(mask & bit))
    record_error("%s: lane %u of warp %u calls %s with mask 0x%08x, which leaves it out", rt.name, me.lane, me.warp,
                 what, mask);
  if (mask & ~existing) {
    record_error("%s: %s with mask 0x%08x in warp %u, whose lanes are 0x%08x", rt.name, what, mask, me.warp, existing);
    mask &= existing;
  }
  mask |= bit;
  if (warp.arrived == 0) {
    warp.mask = mask;
  } else if (mask != warp.mask) {
    record_error("%s: lanes of warp %u call %s with masks 0x%08x and 0x%08x", rt.name, me.warp, what, warp.mask, mask);
    warp.mask |= mask;
  }
  warp.values[me.lane] = bits;
  warp.arrived |= bit;
  me.state = State::kAtShuffle;
  if (warp.arrived == warp.mask) {
    std::copy(std::begin(warp.values), std::end(warp.values), std::begin(warp.published));
    warp.published_mask = warp.mask;
    for (unsigned lane = 0; lane < 32; ++lane)
      if (warp.mask >> lane & 1u) rt.fibers[me.warp * 32 + lane].state = State::kReady;
    warp.arrived = 0;
  }
  if (me.state != State::kReady) yield_to_scheduler();
  if (source >= 32 || !(warp.published_mask >> source & 1u)) {
    record_error("%s: lane %u of warp %u reads lane %u in %s, outside mask 0x%08x", rt.name, me.lane, me.warp, source,
                 what, warp.published_mask);
    return bits;
  }
  return warp.published[source];
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > rt.opt_in_limit) {
    record_error("cudaFuncSetAttribute: %d bytes of dynamic shared memory, more than the %d a block may opt in to "
                 "on this target", bytes, rt.opt_in_limit);
    return cudaErrorInvalidValue;
  }
  rt.shared_opt_in[kernel] = bytes;
  return cudaSuccess;
}

void run_grid(const char* name, const void* kernel, long long grid, unsigned block, std::size_t shared_bytes,
              const std::function<void()>& body) {
  rt.name = name;
  if (!check_launch(kernel, grid, block, shared_bytes)) return;
  rt.launches.push_back({name, grid, block, shared_bytes});
  rt.body = &body;
  rt.grid = dim3(static_cast<unsigned>(grid)), rt.block = dim3(block);
  if (rt.fibers.size() < block) rt.fibers.resize(block);
  rt.warps.assign((block + 31) / 32, Warp{});
  rt.shared.assign(shared_bytes, 0xff);
  std::vector<unsigned> order(grid);
  for (unsigned b = 0; b < grid; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), std::mt19937(static_cast<unsigned>(grid)));  // no block runs first
  rt.counting = true;
  for (unsigned b : order) {
    rt.block_index = {b, 0, 0};
    rt.barrier_error = false;
    run_block(block);
  }
  rt.counting = false;
  finish_counting();
}

}  // namespace acn::simt

using acn::simt::rt;

// ThreadSanitizer's instrumentation calls, answered by the access count.
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define ACN_ACCESS_HOOKS(size)                                                                         \
  void __tsan_read##size(void* p) { acn::simt::check_access(p, size, false); }                         \
  void __tsan_write##size(void* p) { acn::simt::check_access(p, size, true); }                         \
  void __tsan_unaligned_read##size(void* p) { acn::simt::check_access(p, size, false); }               \
  void __tsan_unaligned_write##size(void* p) { acn::simt::check_access(p, size, true); }
ACN_ACCESS_HOOKS(1)
ACN_ACCESS_HOOKS(2)
ACN_ACCESS_HOOKS(4)
ACN_ACCESS_HOOKS(8)
ACN_ACCESS_HOOKS(16)
void __tsan_read_range(void* p, unsigned long size) { acn::simt::check_access(p, size, false); }
void __tsan_write_range(void* p, unsigned long size) { acn::simt::check_access(p, size, true); }

// The API of tools/cuda_host_check.py (ctypes).
void acn_simt_register(const char* name, void* data, unsigned long bytes, unsigned long guard, int writable) {
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  rt.buffers.push_back({name, begin, begin + bytes, guard, writable != 0, std::vector<unsigned char>(bytes),
                        std::vector<unsigned char>(bytes)});
}
// The target's limits: sm_80 (A100) lets a block opt in to 163 KB of shared memory, sm_90 (H100, H200)
// to 227 KB; both allow 48 KB without opting in.
int acn_simt_set_target(int capability) {
  if (capability == 80) rt.opt_in_limit = 163 * 1024;
  else if (capability == 90) rt.opt_in_limit = 227 * 1024;
  else return -1;
  return rt.opt_in_limit;
}
void acn_simt_reset() {
  rt.buffers.clear(), rt.launches.clear(), rt.errors.clear(), rt.shared_opt_in.clear();
  rt.dropped_errors = 0;
}
int acn_simt_launches() { return static_cast<int>(rt.launches.size()); }
void acn_simt_launch(int i, char* name, int name_bytes, char* widths, int widths_bytes, long long* numbers) {
  const auto& launch = rt.launches.at(i);
  std::snprintf(name, name_bytes, "%s", launch.name.c_str());
  std::snprintf(widths, widths_bytes, "%s", launch.widths.c_str());
  const long long values[] = {launch.grid, launch.block, static_cast<long long>(launch.shared), launch.bytes_read,
                              launch.bytes_written};
  std::copy(std::begin(values), std::end(values), numbers);
}
int acn_simt_errors() { return static_cast<int>(rt.errors.size() + rt.dropped_errors); }
void acn_simt_error(int i, char* text, int text_bytes) {
  if (i < static_cast<int>(rt.errors.size())) std::snprintf(text, text_bytes, "%s", rt.errors[i].c_str());
  else std::snprintf(text, text_bytes, "(%zu more errors)", rt.dropped_errors);
}
}
