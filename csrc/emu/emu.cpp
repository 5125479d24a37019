// The emulator's launch code and scheduler (emu.h says what it models).
//
// One OS thread runs a launch: its blocks one after the other in a shuffled order, each block's threads as
// fibers. A fiber runs until it blocks (at a shuffle or a barrier) or exits. The scheduler takes the warps in
// a shuffled order and runs each as far as it goes: its lanes (shuffled), then every shuffle whose mask has
// all arrived, again, until the warp's lanes all wait at the barrier or have exited. When every warp is
// there, the barrier releases (or, if some thread has exited, is an error). A state with no way forward
// is reported, never waited on.
#include "emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <random>

#include "../stable.h"  // TL_CHECK

#if defined(__SANITIZE_ADDRESS__)
#define TL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TL_EMU_ASAN 1
#endif
#endif
#ifdef TL_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace tl_emu {

thread_local uint3 thread_idx, block_idx;
thread_local dim3 block_dim, grid_dim;

namespace {

constexpr int kWarp = 32;
#ifdef TL_EMU_ASAN
constexpr size_t kStack = 512 * 1024;  // ASan's frames are larger
#else
constexpr size_t kStack = 128 * 1024;
#endif

// ---- context switch ------------------------------------------------------------------------------------
#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save and continues on the stack `load` (a stack saved by this function or made by init_stack).
extern "C" void tl_emu_switch(void** save, void* load);
asm(R"(
.pushsection .text
.globl tl_emu_switch
.hidden tl_emu_switch
.type tl_emu_switch,@function
tl_emu_switch:
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
.size tl_emu_switch,.-tl_emu_switch
.popsection
)");

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& save, Context& load) { tl_emu_switch(&save.sp, load.sp); }
void init_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + size)) & ~uintptr_t(15));
  *--sp = nullptr;                              // entry's return address (it never returns)
  *--sp = reinterpret_cast<void*>(entry);       // where tl_emu_switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  *--sp = reinterpret_cast<void*>(uintptr_t(0x1F80) | (uintptr_t(0x037F) << 32));  // MXCSR, x87 CW
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
void init_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---- fibers --------------------------------------------------------------------------------------------
enum class State { Ready, Shuffle, Barrier, Done, Failed };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  State state = State::Ready;
  unsigned tid = 0;
  Shfl kind = Shfl::Sync;
  unsigned mask = 0;
  int bytes = 0, arg = 0, width = 0;
  alignas(16) unsigned char value[16];
  std::string error;
  void* asan_fake = nullptr;
};

// Stacks with a guard page below each, kept per OS thread and reused by every block.
struct StackPool {
  char* base = nullptr;
  size_t count = 0;
  static size_t page() { return size_t(sysconf(_SC_PAGESIZE)); }
  char* get(size_t i) { return base + i * (kStack + page()) + page(); }
  void reserve(size_t n) {
    if (n <= count) return;
    release();
    const size_t bytes = n * (kStack + page());
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TL_CHECK(p != MAP_FAILED, "emulated CUDA: cannot map ", n, " fiber stacks");
    base = static_cast<char*>(p), count = n;
    for (size_t i = 0; i < n; ++i) mprotect(get(i) - page(), page(), PROT_NONE);
  }
  void release() {
    if (base) munmap(base, count * (kStack + page()));
    base = nullptr, count = 0;
  }
  ~StackPool() { release(); }
};

struct LaunchState {
  const char* name;
  void (*body)(void*);
  void* ctx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  Context scheduler;
  const void* scheduler_bottom = nullptr;  // ASan: the scheduler's stack
  size_t scheduler_size = 0;
  LaunchRecord record{};
};

thread_local LaunchState* g_launch = nullptr;
thread_local StackPool g_stacks;

std::mutex g_mutex;  // guards the device settings and the log
int g_sms = 132;
std::map<std::string, int> g_occupancy;
std::deque<LaunchRecord> g_log;
std::atomic<unsigned long long> g_seed{0}, g_launches{0};

inline void asan_start(void** fake, const void* bottom, size_t size) {
#ifdef TL_EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
inline void asan_finish(void* fake, const void** bottom, size_t* size) {
#ifdef TL_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

[[noreturn]] void fiber_entry() {
  LaunchState& l = *g_launch;
  asan_finish(nullptr, &l.scheduler_bottom, &l.scheduler_size);
  Fiber& f = *l.current;
  try {
    l.body(l.ctx);
    f.state = State::Done;
  } catch (const std::exception& e) {
    f.error = e.what(), f.state = State::Failed;
  }
  asan_start(nullptr, l.scheduler_bottom, l.scheduler_size);  // nullptr: this fiber's stack is done
  switch_context(f.ctx, l.scheduler);
  __builtin_unreachable();
}

// In a fiber: back to the scheduler until it resumes this fiber.
void yield(LaunchState& l, Fiber& f) {
  asan_start(&f.asan_fake, l.scheduler_bottom, l.scheduler_size);
  switch_context(f.ctx, l.scheduler);
  asan_finish(f.asan_fake, &l.scheduler_bottom, &l.scheduler_size);
}

void resume(LaunchState& l, Fiber& f) {
  l.current = &f;
  thread_idx = uint3(f.tid, 0, 0);
  void* fake = nullptr;
  asan_start(&fake, f.stack, kStack);
  switch_context(l.scheduler, f.ctx);
  asan_finish(fake, nullptr, nullptr);
  l.current = nullptr;
}

const char* shfl_name(Shfl k) {
  switch (k) {
    case Shfl::Idx: return "__shfl_sync";
    case Shfl::Up: return "__shfl_up_sync";
    case Shfl::Down: return "__shfl_down_sync";
    case Shfl::Xor: return "__shfl_xor_sync";
    default: return "__syncwarp";
  }
}

std::string hex(unsigned v) {
  char s[16];
  std::snprintf(s, sizeof s, "0x%08x", v);
  return s;
}

[[noreturn]] void fail(const LaunchState& l, const std::string& what) {
  TL_CHECK(false, "emulated CUDA kernel ", l.name, ", block ", block_idx.x, ": ", what);
}

void note_mask(LaunchRecord& r, unsigned mask) {
  for (int i = 0; i < r.n_masks; ++i)
    if (r.masks[i] == mask) return;
  if (r.n_masks < 64) r.masks[r.n_masks++] = mask;
}

// The source lane of `lane` for a shuffle, or `lane` itself where CUDA gives the caller's own value.
int source_lane(const Fiber& f, int lane) {
  const int w = f.width, base = lane & ~(w - 1), in = lane - base;
  switch (f.kind) {
    case Shfl::Idx: return base + (f.arg % w);
    case Shfl::Up: return in < f.arg ? lane : lane - f.arg;
    case Shfl::Down: return in + f.arg >= w ? lane : lane + f.arg;
    case Shfl::Xor: {
      const int s = lane ^ f.arg;
      return (s & ~(w - 1)) == base ? s : lane;
    }
    default: return lane;
  }
}

// Completes every shuffle of warp w whose lanes have all arrived. Returns whether any completed.
bool complete_shuffles(LaunchState& l, int w) {
  const int first = w * kWarp, n = int(l.fibers.size());
  bool progressed = false;
  for (int t = first; t < std::min(first + kWarp, n); ++t) {
    Fiber& f = l.fibers[t];
    if (f.state != State::Shuffle) continue;
    bool arrived = true;
    for (int k = 0; k < kWarp && arrived; ++k) {
      if (!(f.mask >> k & 1)) continue;
      if (first + k >= n)
        fail(l, "lane " + std::to_string(t - first) + " calls " + shfl_name(f.kind) + " with mask " + hex(f.mask) +
                    ", which names lane " + std::to_string(k) + " of a warp of " + std::to_string(n - first) +
                    " threads");
      const Fiber& g = l.fibers[first + k];
      arrived = g.state == State::Shuffle && g.mask == f.mask;
      if (arrived && (g.kind != f.kind || g.bytes != f.bytes || g.width != f.width))
        fail(l, "lanes " + std::to_string(t - first) + " and " + std::to_string(k) + " of warp " + std::to_string(w) +
                    " call different shuffles with mask " + hex(f.mask) + " (" + shfl_name(f.kind) + ", " +
                    shfl_name(g.kind) + ")");
    }
    if (!arrived) continue;
    unsigned char out[kWarp][16];
    for (int k = 0; k < kWarp; ++k) {
      if (!(f.mask >> k & 1)) continue;
      const Fiber& g = l.fibers[first + k];
      const int src = source_lane(g, k);
      if (!(f.mask >> src & 1))
        fail(l, "lane " + std::to_string(k) + " of warp " + std::to_string(w) + " reads lane " + std::to_string(src) +
                    " in " + shfl_name(g.kind) + ", outside the mask " + hex(f.mask));
      std::memcpy(out[k], l.fibers[first + src].value, size_t(g.bytes));
    }
    for (int k = 0; k < kWarp; ++k) {
      if (!(f.mask >> k & 1)) continue;
      Fiber& g = l.fibers[first + k];
      std::memcpy(g.value, out[k], size_t(g.bytes));
      g.state = State::Ready;
    }
    note_mask(l.record, f.mask);
    progressed = true;
  }
  return progressed;
}

// Warp w can go no further: a lane still waiting at a shuffle waits forever.
void check_stuck_shuffles(const LaunchState& l, int w) {
  const int first = w * kWarp, n = int(l.fibers.size());
  for (int t = first; t < std::min(first + kWarp, n); ++t) {
    const Fiber& f = l.fibers[t];
    if (f.state != State::Shuffle) continue;
    for (int k = 0; k < kWarp; ++k) {
      const Fiber& g = l.fibers[first + k];
      if (!(f.mask >> k & 1) || (g.state == State::Shuffle && g.mask == f.mask)) continue;
      const std::string where = g.state == State::Done ? std::string("has exited")
                                : g.state == State::Barrier
                                    ? std::string("waits at __syncthreads()")
                                    : std::string("waits at ") + shfl_name(g.kind) + " with mask " + hex(g.mask);
      fail(l, "lane " + std::to_string(t - first) + " of warp " + std::to_string(w) + " waits at " + shfl_name(f.kind) +
                  " with mask " + hex(f.mask) + " for lane " + std::to_string(k) + ", which " + where + ": a deadlock");
    }
  }
}

void check_fiber(const LaunchState& l, const Fiber& f) {
  if (f.state == State::Failed) fail(l, "thread " + std::to_string(f.tid) + ": " + f.error);
}

// Runs warp w until its lanes all wait at __syncthreads() or have exited.
void run_warp(LaunchState& l, int w, std::mt19937_64& rng) {
  const int first = w * kWarp, last = std::min(first + kWarp, int(l.fibers.size()));
  int order[kWarp];
  for (int i = 0; i < last - first; ++i) order[i] = first + i;
  std::shuffle(order, order + (last - first), rng);
  do {
    for (int i = 0; i < last - first; ++i) {
      Fiber& f = l.fibers[order[i]];
      if (f.state == State::Ready) resume(l, f);
      check_fiber(l, f);
    }
  } while (complete_shuffles(l, w));
  check_stuck_shuffles(l, w);
}

void run_block(LaunchState& l, std::mt19937_64& rng) {
  const int n = int(l.fibers.size()), warps = (n + kWarp - 1) / kWarp;
  for (int t = 0; t < n; ++t) {
    Fiber& f = l.fibers[t];
    f.stack = g_stacks.get(size_t(t));
    f.state = State::Ready, f.tid = unsigned(t), f.asan_fake = nullptr;
    init_context(f.ctx, f.stack, kStack, fiber_entry);
  }
  std::vector<int> order(static_cast<size_t>(warps));
  for (int w = 0; w < warps; ++w) order[size_t(w)] = w;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    for (const int w : order) run_warp(l, w, rng);
    int waiting = 0, exited = -1;
    for (const Fiber& f : l.fibers) {
      if (f.state == State::Barrier) ++waiting;
      else exited = int(f.tid);
    }
    if (waiting == 0) return;
    if (exited >= 0)
      fail(l, "__syncthreads() is reached by " + std::to_string(waiting) + " of " + std::to_string(n) +
                  " threads; thread " + std::to_string(exited) +
                  " has exited (every thread of the block must reach it: a hang or undefined behaviour on a GPU)");
    ++l.record.barriers;
    for (Fiber& f : l.fibers) f.state = State::Ready;
  }
}

Fiber& current_fiber(const char* what) {
  TL_CHECK(g_launch && g_launch->current, "emulated CUDA: ", what, " called outside a kernel");
  return *g_launch->current;
}

}  // namespace

void shuffle(Shfl kind, unsigned mask, void* value, int bytes, int arg, int width) {
  Fiber& f = current_fiber(shfl_name(kind));
  LaunchState& l = *g_launch;
  const int lane = int(f.tid % kWarp);
  TL_CHECK(mask >> lane & 1, "lane ", lane, " calls ", shfl_name(kind), " with mask ", hex(mask),
           ", which lacks its own lane");
  TL_CHECK(width > 0 && width <= kWarp && (width & (width - 1)) == 0, shfl_name(kind), ": width ", width,
           " is not a power of 2 up to 32");
  f.kind = kind, f.mask = mask, f.bytes = bytes, f.arg = arg, f.width = width;
  std::memcpy(f.value, value, size_t(bytes));
  f.state = State::Shuffle;
  yield(l, f);
  std::memcpy(value, f.value, size_t(bytes));
}

void syncthreads() {
  Fiber& f = current_fiber("__syncthreads()");
  f.state = State::Barrier;
  yield(*g_launch, f);
}

void run(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  TL_CHECK(grid.x >= 1 && grid.y == 1 && grid.z == 1 && block.x >= 1 && block.x <= 1024 && block.y == 1 && block.z == 1,
           "emulated CUDA kernel ", name, ": invalid configuration argument (grid ", grid.x, "x", grid.y, "x", grid.z,
           ", block ", block.x, "x", block.y, "x", block.z, "; the emulator takes 1-D launches)");
  TL_CHECK(g_launch == nullptr, "emulated CUDA kernel ", name, ": launched from inside a kernel");
  LaunchState l{name, body, ctx};
  l.fibers.resize(block.x);
  l.record.kernel = name, l.record.grid = grid.x, l.record.block = block.x;
  g_stacks.reserve(block.x);
  const unsigned long long launch = g_launches.fetch_add(1);
  std::seed_seq seq{g_seed.load(), launch};
  std::mt19937_64 rng(seq);
  std::vector<unsigned> blocks(grid.x);
  for (unsigned b = 0; b < grid.x; ++b) blocks[b] = b;
  std::shuffle(blocks.begin(), blocks.end(), rng);
  grid_dim = grid, block_dim = block;
  g_launch = &l;
  try {
    for (const unsigned b : blocks) {
      block_idx = uint3(b, 0, 0);
      run_block(l, rng);
    }
  } catch (...) {
    g_launch = nullptr;  // the fibers' stacks are reused by the next launch
#ifdef TL_EMU_ASAN
    // Frames abandoned on the fibers' stacks leave their redzones poisoned.
    for (size_t t = 0; t < l.fibers.size(); ++t) __asan_unpoison_memory_region(g_stacks.get(t), kStack);
#endif
    throw;
  }
  g_launch = nullptr;
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_log.push_back(l.record);
  if (g_log.size() > 4096) g_log.pop_front();
}

int sm_count() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  return g_sms;
}

int blocks_per_sm(const char* name, int threads) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  const std::string_view s = name;
  for (const auto& [key, n] : g_occupancy)
    if (s.find(key) != std::string_view::npos) return n;
  return std::min(32, 2048 / std::max(threads, 1));
}

void set_seed(unsigned long long seed) {
  g_seed = seed;
  g_launches = 0;
}

void set_device(int sms) {
  TL_CHECK(sms >= 1, "the emulated device needs at least one SM, got ", sms);
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_sms = sms;
}

void set_occupancy(const std::string& kernel_substring, int n) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  if (n < 1) g_occupancy.erase(kernel_substring);
  else g_occupancy[kernel_substring] = n;
}

void clear_occupancy() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_occupancy.clear();
}

std::vector<LaunchRecord> launches() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  return {g_log.begin(), g_log.end()};
}

void clear_launches() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_log.clear();
}

}  // namespace tl_emu
