// The emulator's scheduler: fibers with a hand-written x86-64 context switch (glibc's
// swapcontext makes a system call per switch and is several times slower), per-block
// barriers, warp collectives and shared memory, fault reports and deadlock detection.
#include "emu/emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// AddressSanitizer must be told when the stack changes under it, or it misreports.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define AF_ASAN_FIBERS 1
#endif

namespace adaptfuse_emu {

Options& options() {
  static Options instance;
  return instance;
}

namespace {

constexpr size_t kSharedCapacity = 228 * 1024;  // Hopper's largest per-block shared memory
constexpr uint32_t kPoisonWord = 0x7fbadbadu;   // a NaN as float, a huge value as int

#if defined(__x86_64__)
extern "C" void adaptfuse_emu_switch(void** save_sp, void* new_sp);
extern "C" void adaptfuse_emu_trampoline();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer, and resumes the other context the same way.
asm(R"(
  .text
  .globl adaptfuse_emu_switch
  .hidden adaptfuse_emu_switch
  .type adaptfuse_emu_switch,@function
adaptfuse_emu_switch:
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
  .size adaptfuse_emu_switch,.-adaptfuse_emu_switch

  .globl adaptfuse_emu_trampoline
  .hidden adaptfuse_emu_trampoline
  .type adaptfuse_emu_trampoline,@function
adaptfuse_emu_trampoline:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size adaptfuse_emu_trampoline,.-adaptfuse_emu_trampoline
)");
#endif

struct Warp {
  unsigned arrived = 0;   // lanes that reached the current collective
  unsigned mask = 0;      // the mask of the current collective (first arrival's)
  bool draining = false;  // all arrived; lanes are reading the values
  int remaining = 0;      // lanes still to read
  uint64_t generation = 0;
  unsigned char values[32][kExchangeBytes];  // written before read: no initialisation
  const char* what = nullptr;
  const char* file = nullptr;
  int line = 0;
};

enum class Wait { kNone, kBarrier, kWarp, kDone };

}  // namespace

struct Fiber {
  void* sp = nullptr;
  char* stack_top = nullptr;
  size_t stack_bytes = 0;
  void* asan_fake_stack = nullptr;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  uint3 thread_idx{};
  int linear = 0;
  int lane = 0;
  int warp = 0;
  Wait wait = Wait::kNone;
  const char* wait_what = nullptr;
  const char* wait_file = nullptr;
  int wait_line = 0;
  unsigned char exchange[32][kExchangeBytes];  // written before read: no initialisation
  uint64_t exchange_words[32];
  struct PendingCopy {
    void* destination;
    const void* source;
    size_t bytes;
    int group;  // -1 until committed
  };
  std::vector<PendingCopy> pending_copies;
  int committed_groups = 0;
  Block* block = nullptr;
};

struct Block {
  const char* kernel = nullptr;
  uint3 block_idx{};
  dim3 block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  uint64_t progress = 0;
  std::vector<std::pair<const void*, size_t>> shared_sites;
  size_t shared_used = 0;
  char* shared = nullptr;
  char* dynamic_shared = nullptr;
  const KernelBody* body = nullptr;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack_bottom = nullptr;  // for AddressSanitizer
  size_t scheduler_stack_size = 0;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
  bool faulted = false;
  std::string fault_message;
};

namespace {

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;
std::mutex atomic_mutex;

// Stacks and shared memory of one OS thread, reused across blocks and launches.
struct Arena {
  std::vector<char*> stacks;
  size_t stack_bytes = 0;
  std::vector<char> shared = std::vector<char>(kSharedCapacity);
  std::vector<char> dynamic_shared;

  char* stack_top(size_t index, size_t bytes) {
    if (bytes != stack_bytes) {
      release();
      stack_bytes = bytes;
    }
    while (stacks.size() <= index) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* memory =
          mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED) throw Fault("emulator: cannot allocate fiber stacks");
      mprotect(memory, page, PROT_NONE);  // a guard page: an overflowing stack faults loudly
      stacks.push_back(static_cast<char*>(memory));
    }
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return stacks[index] + page + bytes;
  }
  void release() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (char* stack : stacks) munmap(stack, stack_bytes + page);
    stacks.clear();
  }
  ~Arena() { release(); }
};

thread_local Arena tl_arena;

std::string describe_thread(const Block& block, const Fiber& fiber) {
  std::ostringstream out;
  out << "kernel " << block.kernel << ", block (" << block.block_idx.x << ", " << block.block_idx.y
      << ", " << block.block_idx.z << "), thread (" << fiber.thread_idx.x << ", "
      << fiber.thread_idx.y << ", " << fiber.thread_idx.z << ")";
  return out.str();
}

// Fiber side: `finishing` fibers are never resumed (ASan may then drop their fake stack).
void switch_to_scheduler(Fiber* fiber, bool finishing = false) {
#ifdef AF_ASAN_FIBERS
  __sanitizer_start_switch_fiber(finishing ? nullptr : &fiber->asan_fake_stack,
                                 fiber->block->scheduler_stack_bottom,
                                 fiber->block->scheduler_stack_size);
#else
  (void)finishing;
#endif
#if defined(__x86_64__)
  adaptfuse_emu_switch(&fiber->sp, fiber->block->scheduler_sp);
#else
  swapcontext(&fiber->context, &fiber->block->scheduler_context);
#endif
#ifdef AF_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(fiber->asan_fake_stack, &fiber->block->scheduler_stack_bottom,
                                  &fiber->block->scheduler_stack_size);
#endif
}

void yield() { switch_to_scheduler(tl_fiber); }

void fiber_main(Fiber* fiber) {
#ifdef AF_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(nullptr, &fiber->block->scheduler_stack_bottom,
                                  &fiber->block->scheduler_stack_size);
#endif
  (*fiber->block->body)();
  fiber->wait = Wait::kDone;
  ++fiber->block->progress;
  switch_to_scheduler(fiber, /*finishing=*/true);
  __builtin_unreachable();
}

#if !defined(__x86_64__)
void fiber_main_ucontext(unsigned high, unsigned low) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(high) << 32) | low));
}
#endif

void start_fiber(Fiber& fiber, char* stack_top, size_t stack_bytes) {
  fiber.stack_top = stack_top;
  fiber.stack_bytes = stack_bytes;
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t{15});
  uint64_t* sp = top - 8;  // 16-byte aligned: the trampoline's call then aligns fiber_main
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(&sp[0], control, 8);
  sp[1] = 0;                                                      // r15
  sp[2] = 0;                                                      // r14
  sp[3] = 0;                                                      // r13
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);                // r12: entry
  sp[5] = reinterpret_cast<uint64_t>(&fiber);                     // rbx: argument
  sp[6] = 0;                                                      // rbp
  sp[7] = reinterpret_cast<uint64_t>(&adaptfuse_emu_trampoline);  // return address
  fiber.sp = sp;
#else
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack_top - stack_bytes;
  fiber.context.uc_stack.ss_size = stack_bytes;
  fiber.context.uc_link = nullptr;
  const uintptr_t address = reinterpret_cast<uintptr_t>(&fiber);
  makecontext(&fiber.context, reinterpret_cast<void (*)()>(fiber_main_ucontext), 2,
              static_cast<unsigned>(address >> 32), static_cast<unsigned>(address & 0xffffffffu));
#endif
}

void resume(Block& block, Fiber& fiber) {
  tl_fiber = &fiber;
#ifdef AF_ASAN_FIBERS
  void* scheduler_fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, fiber.stack_top - fiber.stack_bytes,
                                 fiber.stack_bytes);
#endif
#if defined(__x86_64__)
  adaptfuse_emu_switch(&block.scheduler_sp, fiber.sp);
#else
  swapcontext(&block.scheduler_context, &fiber.context);
#endif
#ifdef AF_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
}

std::string deadlock_report(const Block& block) {
  std::ostringstream out;
  out << "deadlock in kernel " << block.kernel << ", block (" << block.block_idx.x << ", "
      << block.block_idx.y << ", " << block.block_idx.z << "): no thread can proceed.";
  if (block.barrier_arrived > 0) {
    std::vector<int> exited, elsewhere;
    for (const Fiber& f : block.fibers) {
      if (f.wait == Wait::kDone)
        exited.push_back(f.linear);
      else if (f.wait != Wait::kBarrier)
        elsewhere.push_back(f.linear);
    }
    out << " __syncthreads at " << block.barrier_file << ":" << block.barrier_line << " reached by "
        << block.barrier_arrived << " of " << block.fibers.size() << " threads";
    if (!exited.empty())
      out << "; " << exited.size() << " threads exited before it (first: " << exited[0] << ")";
    if (!elsewhere.empty()) {
      const Fiber& f = block.fibers[elsewhere[0]];
      out << "; " << elsewhere.size() << " threads wait elsewhere (first: thread " << f.linear
          << " in " << f.wait_what << " at " << f.wait_file << ":" << f.wait_line << ")";
    }
    out << ".";
  }
  for (size_t w = 0; w < block.warps.size(); ++w) {
    const Warp& warp = block.warps[w];
    if (warp.arrived == 0 || warp.draining) continue;
    const unsigned missing = warp.mask & ~warp.arrived;
    out << " Warp " << w << ": " << warp.what << " at " << warp.file << ":" << warp.line
        << " with mask 0x" << std::hex << warp.mask << " waits for lanes 0x" << missing << std::dec;
    for (int lane = 0; lane < 32; ++lane) {
      if (!((missing >> lane) & 1u)) continue;
      const size_t index = w * 32 + lane;
      if (index >= block.fibers.size()) {
        out << " (lane " << lane << " does not exist in this block)";
      } else if (block.fibers[index].wait == Wait::kDone) {
        out << " (lane " << lane << " exited)";
      } else {
        const Fiber& f = block.fibers[index];
        out << " (lane " << lane << " waits in " << f.wait_what << " at " << f.wait_file << ":"
            << f.wait_line << ")";
      }
      break;
    }
    out << ".";
  }
  return out.str();
}

void run_block(Block& block, uint64_t block_linear) {
  const Options& opts = options();
  const dim3 dim = block.block_dim;
  const size_t count = static_cast<size_t>(dim.x) * dim.y * dim.z;
  // Fibers are reused from block to block (their exchange buffers need no clearing).
  if (block.fibers.size() != count) block.fibers.resize(count);
  block.warps.resize((count + 31) / 32);
  for (Warp& warp : block.warps) {
    warp.arrived = 0;
    warp.mask = 0;
    warp.draining = false;
    warp.remaining = 0;
    warp.what = warp.file = nullptr;
    warp.line = 0;
  }
  block.barrier_arrived = 0;
  block.shared_sites.clear();
  block.shared_used = 0;
  block.shared = tl_arena.shared.data();
  block.dynamic_shared = tl_arena.dynamic_shared.data();
  {
    auto* words = reinterpret_cast<uint32_t*>(tl_arena.dynamic_shared.data());
    std::fill(words, words + tl_arena.dynamic_shared.size() / 4, kPoisonWord);
  }
  for (size_t i = 0; i < count; ++i) {
    Fiber& f = block.fibers[i];
    f.wait = Wait::kNone;
    f.wait_what = f.wait_file = nullptr;
    f.wait_line = 0;
    f.pending_copies.clear();
    f.committed_groups = 0;
    f.asan_fake_stack = nullptr;
    f.linear = static_cast<int>(i);
    f.thread_idx = {static_cast<unsigned>(i % dim.x), static_cast<unsigned>((i / dim.x) % dim.y),
                    static_cast<unsigned>(i / (static_cast<size_t>(dim.x) * dim.y))};
    f.lane = static_cast<int>(i % 32);
    f.warp = static_cast<int>(i / 32);
    f.block = &block;
    start_fiber(f, tl_arena.stack_top(i, opts.stack_bytes), opts.stack_bytes);
  }
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  std::mt19937_64 rng(opts.seed * 0x9e3779b97f4a7c15ull + block_linear);
  size_t alive = count;
  Block* previous_block = tl_block;
  tl_block = &block;
  while (alive > 0) {
    if (opts.seed != 0) std::shuffle(order.begin(), order.end(), rng);
    const uint64_t progress_before = block.progress;
    for (size_t i : order) {
      Fiber& f = block.fibers[i];
      if (f.wait == Wait::kDone) continue;
      resume(block, f);
      if (block.faulted) {
        tl_block = previous_block;
        throw Fault(block.fault_message);
      }
      if (f.wait == Wait::kDone) --alive;
    }
    if (alive > 0 && block.progress == progress_before) {
      tl_block = previous_block;
      throw Fault(deadlock_report(block));
    }
  }
  tl_block = previous_block;
}

}  // namespace

const uint3& thread_index() { return tl_fiber->thread_idx; }
const uint3& block_index() { return tl_block->block_idx; }
const dim3& block_dim() { return tl_block->block_dim; }
const dim3& grid_dim() { return tl_block->grid_dim; }
int lane_id() { return tl_fiber->lane; }

void fault(const std::string& what, const char* file, int line) {
  std::ostringstream out;
  if (tl_fiber != nullptr && tl_block != nullptr)
    out << describe_thread(*tl_block, *tl_fiber) << ": ";
  out << what << " (" << file << ":" << line << ")";
  if (tl_fiber == nullptr || tl_block == nullptr) throw Fault(out.str());
  tl_block->faulted = true;
  tl_block->fault_message = out.str();
  Fiber* fiber = tl_fiber;
  fiber->wait = Wait::kDone;
  switch_to_scheduler(fiber, /*finishing=*/true);  // never resumed: the launch is abandoned
  __builtin_unreachable();
}

void syncthreads(const char* file, int line) {
  Block& block = *tl_block;
  Fiber& fiber = *tl_fiber;
  if (block.barrier_arrived == 0) {
    block.barrier_file = file;
    block.barrier_line = line;
  } else if (block.barrier_line != line || std::strcmp(block.barrier_file, file) != 0) {
    std::ostringstream out;
    out << "divergent __syncthreads: this thread waits at line " << line << " while others wait at "
        << block.barrier_file << ":" << block.barrier_line;
    fault(out.str(), file, line);
  }
  fiber.wait = Wait::kBarrier;
  fiber.wait_what = "__syncthreads";
  fiber.wait_file = file;
  fiber.wait_line = line;
  const uint64_t generation = block.barrier_generation;
  ++block.barrier_arrived;
  ++block.progress;
  if (block.barrier_arrived == static_cast<int>(block.fibers.size())) {
    block.barrier_arrived = 0;
    ++block.barrier_generation;
  }
  while (block.barrier_generation == generation) yield();
  fiber.wait = Wait::kNone;
}

const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what, const char* file,
                              int line) {
  const unsigned char* all = warp_exchange_bytes(mask, &value, sizeof(value), what, file, line);
  Fiber& fiber = *tl_fiber;
  for (int lane = 0; lane < 32; ++lane)
    std::memcpy(&fiber.exchange_words[lane], all + lane * kExchangeBytes, 8);
  return fiber.exchange_words;
}

const unsigned char* warp_exchange_bytes(unsigned mask, const void* data, size_t bytes,
                                         const char* what, const char* file, int line) {
  if (bytes > kExchangeBytes) fault("warp exchange of more than 64 bytes per lane", file, line);
  Block& block = *tl_block;
  Fiber& fiber = *tl_fiber;
  Warp& warp = block.warps[fiber.warp];
  const unsigned own = 1u << fiber.lane;
  if (!(mask & own))
    fault(std::string(what) + " called by a lane that its mask does not include", file, line);
  fiber.wait = Wait::kWarp;
  fiber.wait_what = what;
  fiber.wait_file = file;
  fiber.wait_line = line;
  // Wait while the previous collective is being read, and while lanes of a disjoint group
  // (divergent code, other mask) are gathering: that group completes on its own.
  while (warp.draining || (warp.arrived != 0 && (warp.mask & mask) == 0)) yield();
  if (warp.arrived == 0) {
    warp.mask = mask;
    warp.what = what;
    warp.file = file;
    warp.line = line;
  } else if (warp.mask != mask || std::strcmp(warp.what, what) != 0) {
    std::ostringstream out;
    out << what << " with mask 0x" << std::hex << mask << " meets " << warp.what << " with mask 0x"
        << warp.mask << std::dec << " at " << warp.file << ":" << warp.line
        << " from other lanes of the warp";
    fault(out.str(), file, line);
  }
  std::memcpy(warp.values[fiber.lane], data, bytes);
  warp.arrived |= own;
  ++block.progress;
  const uint64_t generation = warp.generation;
  if (warp.arrived == mask) {
    warp.draining = true;
    warp.remaining = __builtin_popcount(mask);
    ++warp.generation;
  }
  while (warp.generation == generation) yield();
  std::memcpy(fiber.exchange, warp.values, sizeof(fiber.exchange));
  if (--warp.remaining == 0) {
    warp.draining = false;
    warp.arrived = 0;
  }
  ++block.progress;
  fiber.wait = Wait::kNone;
  return &fiber.exchange[0][0];
}

void async_copy(void* destination, const void* source, size_t bytes) {
  tl_fiber->pending_copies.push_back({destination, source, bytes, -1});
}

void async_commit() {
  Fiber& fiber = *tl_fiber;
  for (auto& copy : fiber.pending_copies) {
    if (copy.group < 0) copy.group = fiber.committed_groups;
  }
  ++fiber.committed_groups;
}

void async_wait(int newest_groups_left_pending) {
  Fiber& fiber = *tl_fiber;
  const int complete_below = fiber.committed_groups - newest_groups_left_pending;
  auto& pending = fiber.pending_copies;
  for (auto& copy : pending) {
    if (copy.group >= 0 && copy.group < complete_below)
      std::memcpy(copy.destination, copy.source, copy.bytes);
  }
  pending.erase(std::remove_if(pending.begin(), pending.end(),
                               [&](const Fiber::PendingCopy& c) {
                                 return c.group >= 0 && c.group < complete_below;
                               }),
                pending.end());
}

void syncwarp(unsigned mask, const char* file, int line) {
  warp_exchange(mask, 0, "__syncwarp", file, line);
}

unsigned ballot(unsigned mask, bool predicate, const char* file, int line) {
  const uint64_t* values = warp_exchange(mask, predicate ? 1 : 0, "__ballot_sync", file, line);
  unsigned result = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && values[lane] != 0) result |= 1u << lane;
  }
  return result;
}

void* shared_storage(const void* site, size_t bytes, size_t alignment) {
  Block& block = *tl_block;
  for (const auto& [known, offset] : block.shared_sites) {
    if (known == site) return block.shared + offset;
  }
  const size_t offset = (block.shared_used + alignment - 1) / alignment * alignment;
  if (offset + bytes > kSharedCapacity) {
    fault("static shared memory exceeds " + std::to_string(kSharedCapacity) + " bytes per block",
          "<shared>", 0);
  }
  auto* words = reinterpret_cast<uint32_t*>(block.shared + offset);
  std::fill(words, words + (bytes + 3) / 4, kPoisonWord);
  block.shared_used = offset + bytes;
  block.shared_sites.emplace_back(site, offset);
  return block.shared + offset;
}

void* dynamic_shared_storage() { return tl_block->dynamic_shared; }

void check_alignment(const void* pointer, size_t alignment, const char* what, const char* file,
                     int line) {
  if (reinterpret_cast<uintptr_t>(pointer) % alignment != 0) {
    std::ostringstream out;
    out << "misaligned " << what << ": address " << pointer << " is not a multiple of "
        << alignment;
    fault(out.str(), file, line);
  }
}

int atomic_add(int* address, int value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const int old = *address;
  *address = old + value;
  return old;
}

unsigned atomic_add(unsigned* address, unsigned value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const unsigned old = *address;
  *address = old + value;
  return old;
}

float atomic_add(float* address, float value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}

void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block_dim,
            size_t dynamic_shared_bytes, const KernelBody& body) {
  const uint64_t threads = static_cast<uint64_t>(block_dim.x) * block_dim.y * block_dim.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || blocks == 0 || grid.y > 65535 || grid.z > 65535) {
    std::ostringstream out;
    out << "invalid launch configuration of " << kernel << " at " << file << ":" << line
        << ": grid (" << grid.x << ", " << grid.y << ", " << grid.z << "), block (" << block_dim.x
        << ", " << block_dim.y << ", " << block_dim.z << ")";
    throw Fault(out.str());
  }
  if (dynamic_shared_bytes > kSharedCapacity)
    throw Fault(std::string("dynamic shared memory too large for ") + kernel);
  const int os_threads = std::max(1, std::min<int>(options().os_threads, static_cast<int>(blocks)));
  std::mutex fault_mutex;
  std::string first_fault;
  std::atomic<bool> failed{false};
  auto run_blocks = [&](int worker) {
    try {
      tl_arena.dynamic_shared.resize((dynamic_shared_bytes + 3) / 4 * 4);
      Block block;
      block.kernel = kernel;
      block.block_dim = block_dim;
      block.grid_dim = grid;
      block.body = &body;
      for (uint64_t b = static_cast<uint64_t>(worker); b < blocks && !failed.load();
           b += os_threads) {
        block.block_idx = {static_cast<unsigned>(b % grid.x),
                           static_cast<unsigned>((b / grid.x) % grid.y),
                           static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
        run_block(block, b);
      }
    } catch (const Fault& error) {
      std::lock_guard<std::mutex> lock(fault_mutex);
      if (!failed.exchange(true)) first_fault = error.what();
    }
  };
  if (os_threads == 1) {
    run_blocks(0);
  } else {
    std::vector<std::thread> workers;
    for (int w = 0; w < os_threads; ++w) workers.emplace_back(run_blocks, w);
    for (std::thread& worker : workers) worker.join();
  }
  if (failed) throw Fault(first_fault);
}

}  // namespace adaptfuse_emu
