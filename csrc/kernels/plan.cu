// plan: tokens grouped by slot without host synchronisation. Simple kernels: one block per
// slot counts its tokens, one thread scans the counts, one block per slot (plus one for the
// tokens without a slot) writes its tokens in their original order with a block-wide scan.
#include "kernels/device.cuh"
#include "kernels/launchers.h"

namespace adaptfuse {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kPlanWarps = kPlanThreads / 32;

__device__ __forceinline__ int64_t bucket_of(int32_t slot, int64_t num_slots) {
  return (slot >= 0 && slot < num_slots) ? slot : num_slots;  // num_slots: "no slot"
}

__global__ void count_tokens_per_slot(const int32_t* token_slots, int64_t num_tokens,
                                      int64_t num_slots, int32_t* slot_offsets) {
  AF_SHARED_ARRAY(int, warp_totals, kPlanWarps);
  const int64_t slot = blockIdx.x;
  int count = 0;
  for (int64_t t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    count += bucket_of(token_slots[t], num_slots) == slot ? 1 : 0;
  }
  count = warp_sum(count);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kPlanWarps; ++w) total += warp_totals[w];
    slot_offsets[slot + 1] = total;
  }
}

__global__ void scan_slot_counts(int64_t num_slots, int32_t* slot_offsets) {
  int32_t running = 0;
  slot_offsets[0] = 0;
  for (int64_t s = 1; s <= num_slots; ++s) {
    running += slot_offsets[s];
    slot_offsets[s] = running;
  }
}

__global__ void write_token_order(const int32_t* token_slots, int64_t num_tokens, int64_t num_slots,
                                  const int32_t* slot_offsets, int32_t* token_order) {
  AF_SHARED_ARRAY(int, warp_counts, kPlanWarps);
  AF_SHARED_ARRAY(int, warp_starts, kPlanWarps);
  AF_SHARED(int, chunk_total);
  const int64_t bucket = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t write_position = slot_offsets[bucket < num_slots ? bucket : num_slots];
  for (int64_t chunk = 0; chunk < num_tokens; chunk += blockDim.x) {
    const int64_t t = chunk + threadIdx.x;
    const bool mine = t < num_tokens && bucket_of(token_slots[t], num_slots) == bucket;
    const unsigned ballot = warp_ballot(mine);
    if (lane == 0) warp_counts[warp] = popcount(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
      int running = 0;
      for (int w = 0; w < kPlanWarps; ++w) {
        warp_starts[w] = running;
        running += warp_counts[w];
      }
      chunk_total = running;
    }
    __syncthreads();
    if (mine) {
      const int rank_in_warp = popcount(ballot & ((1u << lane) - 1u));
      token_order[write_position + warp_starts[warp] + rank_in_warp] = static_cast<int32_t>(t);
    }
    write_position += chunk_total;
    __syncthreads();  // warp_counts and chunk_total are rewritten by the next chunk
  }
}

}  // namespace

cudaError_t launch_plan(const PlanArgs& args, cudaStream_t stream) {
  cudaError_t status = cudaSuccess;
  if (args.num_slots > 0) {
    status = AF_LAUNCH("count_tokens_per_slot", count_tokens_per_slot,
                       dim3(static_cast<unsigned>(args.num_slots)), dim3(kPlanThreads), 0, stream,
                       args.token_slots, args.num_tokens, args.num_slots, args.slot_offsets);
    if (status != cudaSuccess) return status;
  }
  status = AF_LAUNCH("scan_slot_counts", scan_slot_counts, dim3(1), dim3(1), 0, stream,
                     args.num_slots, args.slot_offsets);
  if (status != cudaSuccess || args.num_tokens == 0) return status;
  return AF_LAUNCH("write_token_order", write_token_order,
                   dim3(static_cast<unsigned>(args.num_slots + 1)), dim3(kPlanThreads), 0, stream,
                   args.token_slots, args.num_tokens, args.num_slots,
                   static_cast<const int32_t*>(args.slot_offsets), args.token_order);
}

}  // namespace adaptfuse
