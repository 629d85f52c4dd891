// The execution layer of the emulated CUDA tier (see cuda_emulated.h): each block's threads run as
// fibers on one OS thread, switched by a hand-written context switch (x86-64; ucontext elsewhere),
// scheduled round-robin: a fiber runs until it reaches a barrier (__syncthreads, a warp shuffle) or
// exits; a barrier opens when every thread it waits for has arrived. A barrier that can never open
// (threads of one block waiting at different barriers) is reported, where a GPU would hang.
//
// Also the test ops of this build (library sambayes_emulated*): the stream and capture stubs that
// drive the table cache's logic, counters (Philox calls, record_stream), the negative controls.
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "multi_tensor_cuda.cuh"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SB_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace sambayes::emulated {

thread_local ThreadIndex current;

namespace {

// ---- the context switch -----------------------------------------------------------------------
#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save, loads `load` and restores the same from there (System V ABI).
extern "C" void sambayes_switch_context(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .hidden sambayes_switch_context
  .type sambayes_switch_context, @function
sambayes_switch_context:
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
  .size sambayes_switch_context, .-sambayes_switch_context
)");

struct Context {
  void* sp = nullptr;
};

// A fresh context that enters entry() on `stack`: the frame sambayes_switch_context pops, with entry as
// its return address, placed so that entry starts with the stack aligned as after a call.
void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  top[-1] = 0;                                   // entry's return address: it never returns
  top[-2] = reinterpret_cast<uint64_t>(entry);  // where the switch's ret goes
  for (int k = 3; k <= 8; ++k) top[-k] = 0;     // rbp, rbx, r12 .. r15
  uint32_t mxcsr;
  uint16_t fpu;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu));
  auto* control = reinterpret_cast<uint32_t*>(top - 9);
  control[0] = mxcsr;
  control[1] = fpu;
  context.sp = top - 9;
}

void switch_context(Context& from, const Context& to) { sambayes_switch_context(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- fibers and the block scheduler -------------------------------------------------------------

#if defined(SB_ASAN)
constexpr size_t kStackBytes = size_t{1} << 19;  // AddressSanitizer's redzones make frames larger
#else
constexpr size_t kStackBytes = size_t{1} << 17;
#endif
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kWarp = 32;

enum class State { kRunnable, kAtBarrier, kAtShuffle, kExited };

struct Fiber {
  Context context;
  char* stack = nullptr;  // kStackBytes above a guard page, reused by every block this OS thread runs
  State state = State::kRunnable;
  unsigned shuffles = 0;  // warp shuffles made: their parity picks the exchange slot
  void* fake_stack = nullptr;
};

struct Scheduler {
  std::vector<std::unique_ptr<Fiber>> fibers;
  Context context;  // the OS thread's own
  Fiber* running = nullptr;
  unsigned threads = 0;
  void (*call)(const void*) = nullptr;
  const void* body = nullptr;
  uint64_t exchange[2][kMaxThreads];  // warp shuffles: a lane deposits here, then reads its source lane
  const void* stack_bottom = nullptr;  // the OS thread's stack, for AddressSanitizer
  size_t stack_size = 0;
  void* fake_stack = nullptr;

  ~Scheduler() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (auto& fiber : fibers) munmap(fiber->stack - page, kStackBytes + page);
  }
};

thread_local Scheduler scheduler;

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(memory != MAP_FAILED, "cuda-emulated: cannot map a fiber stack");
  mprotect(memory, page, PROT_NONE);  // an overflow faults instead of corrupting the next stack
  return static_cast<char*>(memory) + page;
}

// The fiber's side of a switch (AddressSanitizer is told which stack runs next).
void to_scheduler(Fiber& fiber, bool exited) {
#if defined(SB_ASAN)
  __sanitizer_start_switch_fiber(exited ? nullptr : &fiber.fake_stack, scheduler.stack_bottom, scheduler.stack_size);
#endif
  switch_context(fiber.context, scheduler.context);
#if defined(SB_ASAN)
  __sanitizer_finish_switch_fiber(fiber.fake_stack, nullptr, nullptr);
#endif
  (void)exited;
}

void resume(Fiber& fiber, unsigned index) {
  scheduler.running = &fiber;
  current.thread = {index, 1, 1};
#if defined(SB_ASAN)
  __sanitizer_start_switch_fiber(&scheduler.fake_stack, fiber.stack, kStackBytes);
#endif
  switch_context(scheduler.context, fiber.context);
#if defined(SB_ASAN)
  __sanitizer_finish_switch_fiber(scheduler.fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] void fiber_main() {
#if defined(SB_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.stack_bottom, &scheduler.stack_size);
#endif
  scheduler.call(scheduler.body);
  Fiber& fiber = *scheduler.running;
  fiber.state = State::kExited;
  to_scheduler(fiber, /*exited=*/true);
  __builtin_unreachable();
}

// Open the barriers every waiting thread has reached; false if none opened.
bool open_barriers() {
  auto& fibers = scheduler.fibers;
  const unsigned n = scheduler.threads;
  bool opened = false;
  for (unsigned warp = 0; warp * kWarp < n; ++warp) {
    const unsigned first = warp * kWarp, last = std::min(n, first + kWarp);
    unsigned waiting = 0;
    for (unsigned t = first; t < last; ++t) waiting += fibers[t]->state == State::kAtShuffle;
    if (waiting == 0 || waiting < last - first) continue;  // a full-warp shuffle waits for every lane
    for (unsigned t = first; t < last; ++t) fibers[t]->state = State::kRunnable;
    opened = true;
  }
  unsigned at_barrier = 0, exited = 0;
  for (unsigned t = 0; t < n; ++t) {
    at_barrier += fibers[t]->state == State::kAtBarrier;
    exited += fibers[t]->state == State::kExited;
  }
  if (at_barrier > 0 && at_barrier + exited == n) {  // threads that exited do not hold a barrier (sm_70+)
    for (unsigned t = 0; t < n; ++t) {
      if (fibers[t]->state == State::kAtBarrier) fibers[t]->state = State::kRunnable;
    }
    opened = true;
  }
  return opened;
}

void run_block(unsigned block, unsigned threads, unsigned blocks) {
  auto& fibers = scheduler.fibers;
  while (fibers.size() < threads) {
    fibers.push_back(std::make_unique<Fiber>());
    fibers.back()->stack = new_stack();
  }
  current.block = {block, 1, 1};
  current.block_dim = {threads, 1, 1};
  current.grid_dim = {blocks, 1, 1};
  scheduler.threads = threads;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& fiber = *fibers[t];
#if defined(SB_ASAN)
    __asan_unpoison_memory_region(fiber.stack, kStackBytes);  // the frames of the last block's threads
#endif
    make_context(fiber.context, fiber.stack, kStackBytes, fiber_main);
    fiber.state = State::kRunnable;
    fiber.shuffles = 0;
  }
  for (unsigned exited = 0; exited < threads;) {
    bool ran = false;
    for (unsigned t = 0; t < threads; ++t) {
      if (fibers[t]->state != State::kRunnable) continue;
      resume(*fibers[t], t);
      ran = true;
      exited += fibers[t]->state == State::kExited;
    }
    TORCH_CHECK(ran || exited == threads || open_barriers(), "cuda-emulated: block ", block,
                " deadlocks: its threads wait at barriers that cannot open (a __syncthreads or a full-warp "
                "shuffle not reached by every thread)");
  }
}

// ---- the stubs the tests set, and counters --------------------------------------------------------
std::atomic<int64_t> stream_id{0};
std::atomic<bool> capture_active{false};
std::atomic<int64_t> philox_calls{0};
std::atomic<int64_t> recorded_streams{0};
std::atomic<int> fault{static_cast<int>(Fault::kNone)};

}  // namespace

void syncthreads() {
  Fiber& fiber = *scheduler.running;
  fiber.state = State::kAtBarrier;
  to_scheduler(fiber, false);
}

uint64_t shuffle_bits(uint64_t bits, unsigned lane_mask, unsigned source) {
  if (lane_mask != 0xFFFFFFFFu) {  // no exception may leave a fiber
    std::fprintf(stderr, "cuda-emulated: only full-warp shuffles are emulated, got mask %x\n", lane_mask);
    std::abort();
  }
  Fiber& fiber = *scheduler.running;
  const unsigned lane = current.thread.x, warp_first = lane - lane % kWarp;
  auto& slots = scheduler.exchange[fiber.shuffles++ % 2];
  slots[lane] = bits;
  fiber.state = State::kAtShuffle;
  to_scheduler(fiber, false);  // back when every lane of the warp has deposited its value
  return slots[warp_first + source];
}

void launch_erased(unsigned blocks, unsigned threads, void (*call)(const void*), const void* body) {
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads, "cuda-emulated: ", threads, " threads per block");
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    scheduler.call = call;
    scheduler.body = body;
    for (int64_t b = lo; b < hi; ++b) run_block(static_cast<unsigned>(b), threads, blocks);
  });
}

Stream stream() { return {stream_id.load()}; }
bool capturing() { return capture_active.load(); }
void recorded(const at::Tensor&, Stream) { recorded_streams.fetch_add(1); }
Fault injected_fault() { return static_cast<Fault>(fault.load()); }
void count_philox_call() { philox_calls.fetch_add(1, std::memory_order_relaxed); }

namespace {

void set_stream(int64_t id) { stream_id = id; }
void set_capturing(bool value) { capture_active = value; }

// [Philox calls, record_stream calls, cached tables, tables held for CUDA graphs]; reset: zero the counters.
std::vector<int64_t> counters(bool reset) {
  const auto tables = table_cache().stats();
  std::vector<int64_t> out{philox_calls.load(), recorded_streams.load(), tables.first, tables.second};
  if (reset) philox_calls = recorded_streams = 0;
  return out;
}

void clear_tables() { table_cache().clear(); }

void inject_fault(const std::string& kind) {
  TORCH_CHECK(kind.empty() || kind == "misaligned" || kind == "overrun", "inject_fault: unknown fault ", kind);
  fault = static_cast<int>(kind == "misaligned" ? Fault::kMisaligned
                           : kind == "overrun"  ? Fault::kOverrun
                                                : Fault::kNone);
}

}  // namespace

// sambayes_C is this build's library name (sambayes/_build.py defines it to sambayes_emulated*)
TORCH_LIBRARY_FRAGMENT(sambayes_C, m) {
  m.def("set_stream(int id) -> ()", &set_stream);
  m.def("set_capturing(bool capturing) -> ()", &set_capturing);
  m.def("counters(bool reset=False) -> int[]", &counters);
  m.def("clear_tables() -> ()", &clear_tables);
  m.def("inject_fault(str kind) -> ()", &inject_fault);
}

}  // namespace sambayes::emulated
