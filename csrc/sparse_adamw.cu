// CUDA sparse AdamW: a prepare kernel over the rows, then one update launch per
// (param dtype, grad kind) segment over all selected entries of its rows.
//
// Entry space: rows of a segment in offset order, entries of a row
// consecutive, so compact states (exp_avg, exp_avg_sq, master) are read and
// written coalesced; only g[idx] and theta[idx] are gathers/scatters. Offsets
// and flat indices are int64 in the arithmetic (a 2^31-element tensor is still
// updated; see DeepSpeed#7640 for the int32 version of that bug); a tensor of
// fewer than 2^31 weights stores its index list as int32.
#include <cuda_runtime.h>

#include "gallop/sparse_adamw.h"

namespace gallop {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // entries per thread per tile, loaded together before any store
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;

// Pass 1: one thread per row. The update kernels run after it on the stream.
__global__ void sparse_adamw_prepare_kernel(SparseAdamWTensor* __restrict__ rows, int n,
                                            const float* __restrict__ found_inf) {
  if (skip_step(found_inf)) return;
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < n; r += gridDim.x * blockDim.x) {
    sparse_adamw_prepare(rows[r]);
  }
}

// Pass 2. The table is read-only here (const __restrict__: the compiler may keep
// its fields in registers across the entries' stores), and each thread loads
// all kItems entries of a tile before it computes and stores any, so the
// gathers of g[idx] and theta[idx] are in flight together.
template <int32_t P, int32_t G>
__global__ void __launch_bounds__(kThreads) sparse_adamw_kernel(const SparseAdamWTensor* __restrict__ rows, int n,
                                                                int64_t total, const float* __restrict__ grad_scale,
                                                                const float* __restrict__ found_inf) {
  // The skip happens here, on the device: no host sync on found_inf.
  if (skip_step(found_inf)) return;
  const float inv_scale = inverse_scale(grad_scale);
  __shared__ int first_row;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTile; tile < total;
       tile += static_cast<int64_t>(gridDim.x) * kTile) {
    __syncthreads();  // first_row of the previous tile is no longer read
    if (threadIdx.x == 0) first_row = row_of(rows, n, tile);
    __syncthreads();
    int row[kItems];
    int64_t at[kItems];
    SparseAdamWEntry x[kItems];
    int r = first_row;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      int64_t e = tile + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      row[k] = -1;
      if (e < total) {
        while (e >= rows[r].offset + rows[r].count) ++r;  // empty rows are not in the table
        row[k] = r;
        at[k] = e - rows[r].offset;
        x[k] = sparse_adamw_load<P, G>(rows[r], at[k], inv_scale);
      }
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (row[k] >= 0) {
        const SparseAdamWTensor& t = rows[row[k]];
        adamw_update(x[k].theta, x[k].g, x[k].m, x[k].v, x[k].vmax, t.s);
        sparse_adamw_store<P>(t, at[k], x[k]);
      }
    }
  }
}

struct Launch {
  const SparseAdamWTensor* rows;
  int n;
  int64_t total;
  const float* grad_scale;
  const float* found_inf;
  int sms;
  cudaStream_t stream;

  template <int32_t P, int32_t G>
  void operator()() const {
    // Persistent-style grid: enough blocks to fill every SM several times, then
    // a grid-stride loop over tiles.
    int64_t tiles = (total + kTile - 1) / kTile;
    int64_t blocks = tiles < static_cast<int64_t>(sms) * 8 ? tiles : static_cast<int64_t>(sms) * 8;
    sparse_adamw_kernel<P, G><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(rows, n, total, grad_scale,
                                                                                     found_inf);
  }
};

}  // namespace

int sparse_adamw_cuda(const SparseAdamWStep& step, void* stream_ptr) {
  if (step.num_rows <= 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  int prep_blocks = (step.num_rows + kThreads - 1) / kThreads;
  sparse_adamw_prepare_kernel<<<prep_blocks, kThreads, 0, stream>>>(step.table, step.num_rows, step.found_inf);
  for (int32_t s = 0; s < step.num_segments; ++s) {
    const int64_t* seg = step.segments + 5 * s;
    if (seg[1] <= 0 || seg[2] <= 0) continue;
    Launch launch{step.table + seg[0], static_cast<int>(seg[1]), seg[2], step.grad_scale, step.found_inf, sms, stream};
    dispatch_dtypes(static_cast<int32_t>(seg[3]), static_cast<int32_t>(seg[4]), launch);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace gallop
