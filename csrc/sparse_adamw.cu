// CUDA sparse AdamW: one launch over all selected entries of all parameters.
//
// Entry space: rows of the device-side table in offset order, entries of a row
// consecutive, so compact states (exp_avg, exp_avg_sq, master) are read and
// written coalesced; only g[idx] and theta[idx] are gathers/scatters. Offsets
// and indices are int64 throughout (a 2^31-element tensor is still updated;
// see DeepSpeed#7640 for the int32 version of that bug).
#include <cuda_runtime.h>

#include "gallop/sparse_adamw.h"

namespace gallop {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // entries per thread per tile: 4 independent gathers in flight
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;

// Row holding global entry e: binary search over the table's offsets.
__device__ int row_of(const SparseAdamWTensor* rows, int n, int64_t e) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (rows[mid].offset <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads) sparse_adamw_kernel(SparseAdamWParams p) {
  // The skip happens here, on the device: no host sync on found_inf.
  if (p.found_inf && *p.found_inf != 0.0f) return;
  const float inv_scale = p.inv_grad_scale ? *p.inv_grad_scale : 1.0f;
  __shared__ int first_row;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTile; tile < p.total;
       tile += static_cast<int64_t>(gridDim.x) * kTile) {
    __syncthreads();  // first_row of the previous tile is no longer read
    if (threadIdx.x == 0) first_row = row_of(p.tensors, p.num_tensors, tile);
    __syncthreads();
    int r = first_row;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      int64_t e = tile + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      if (e >= p.total) break;
      while (e >= p.tensors[r].offset + p.tensors[r].count) ++r;  // rows are short to skip: empty rows are not in the table
      sparse_adamw_entry(p.tensors[r], e - p.tensors[r].offset, inv_scale);
    }
  }
}

}  // namespace

int sparse_adamw_cuda(const SparseAdamWParams& p, void* stream) {
  if (p.total <= 0 || p.num_tensors <= 0) return 0;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  // Persistent-style grid: enough blocks to fill every SM several times, then
  // a grid-stride loop over tiles.
  int64_t tiles = (p.total + kTile - 1) / kTile;
  int64_t blocks = tiles < static_cast<int64_t>(sms) * 8 ? tiles : static_cast<int64_t>(sms) * 8;
  sparse_adamw_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace gallop
