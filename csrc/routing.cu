// Routing kernels (docs/architecture.md, "Routing"): Top-K + masked softmax over M <= 32 logits per token, its backward,
// and the per-bank-layer row lists the streaming path consumes. CUDA toolkit only; see geoalign_cuda.h.
#include "common.cuh"

#include <limits.h>

namespace geoalign {
namespace {

constexpr int kRouteThreads = 256;

// Group width: the smallest power of two >= M. Each row owns one W-lane group of a warp (32/W rows per warp), so
// xor-shuffles with offsets < W stay inside the row's group while all 32 lanes take part (full mask).
inline int group_width(int M) {
  int w = 1;
  while (w < M) w <<= 1;
  return w;
}

// Does candidate (va, ia) outrank the current best (vb, ib)? An index >= W marks "no candidate" and never wins.
// Order: larger value first, NaN above every number (as torch.sort(descending=True)), ties -> lower index.
template <typename Acc>
__device__ __forceinline__ bool outranks(Acc va, int ia, Acc vb, int ib, int W) {
  if (ia >= W) return false;
  if (ib >= W) return true;
  const bool na = acc_isnan(va), nb = acc_isnan(vb);
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ia < ib;  // equal values (or both NaN): the lower bank index wins
}

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
route_topk_softmax_kernel(const T* __restrict__ logits, int64_t L, int M, int K, int W,
                          int64_t* __restrict__ topk_idx, typename AccOf<T>::type* __restrict__ alpha) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int sub = lane & (W - 1);             // lane within the row's group
  const int group_base = lane & ~(W - 1);     // first lane of the group
  const int rows_per_warp = 32 / W;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp_id * rows_per_warp >= L) return;   // warp-uniform: the whole warp leaves together
  const int64_t row = warp_id * rows_per_warp + lane / W;
  const bool row_ok = row < L;

  // candidate of this lane: logit `sub` of the row (index >= W means "none")
  Acc v = Acc(0);
  int my = W;
  if (row_ok && sub < M) {
    v = to_acc<Acc>(logits[row * M + sub]);
    my = sub;
  }
  Acc sel_v = Acc(0);  // lane k of the group keeps the k-th selection
  int sel_i = 0;
  for (int k = 0; k < K; ++k) {  // K rounds of a group arg-max (K is uniform over the grid)
    Acc bv = v;
    int bi = my;
    for (int o = W >> 1; o > 0; o >>= 1) {
      const Acc ov = __shfl_xor_sync(kFullMask, bv, o);
      const int oi = __shfl_xor_sync(kFullMask, bi, o);
      if (outranks(ov, oi, bv, bi, W)) {
        bv = ov;
        bi = oi;
      }
    }
    if (sub == k) {
      sel_v = bv;
      sel_i = bi;
    }
    if (my < W && my == bi) my = W;  // the winner leaves the candidates
  }
  // softmax over the K kept logits; selection 0 is the largest (or NaN, which then propagates as in torch)
  const Acc mx = __shfl_sync(kFullMask, sel_v, group_base);
  Acc e = (sub < K) ? acc_exp(sel_v - mx) : Acc(0);
  Acc s = e;
  for (int o = W >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
  if (row_ok && sub < K) {
    const int64_t out = row * K + sub;
    topk_idx[out] = static_cast<int64_t>(sel_i);
    alpha[out] = e / s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
route_backward_kernel(const typename AccOf<T>::type* __restrict__ d_alpha,
                      const typename AccOf<T>::type* __restrict__ alpha, const int64_t* __restrict__ topk_idx,
                      int64_t L, int M, int K, int W, T* __restrict__ d_logits) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int sub = lane & (W - 1);
  const int group_base = lane & ~(W - 1);
  const int rows_per_warp = 32 / W;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp_id * rows_per_warp >= L) return;  // warp-uniform
  const int64_t row = warp_id * rows_per_warp + lane / W;
  const bool row_ok = row < L;

  Acc a = Acc(0), da = Acc(0);
  int64_t idx = -1;
  if (row_ok && sub < K) {
    const int64_t off = row * K + sub;
    a = alpha[off];
    da = d_alpha[off];
    idx = topk_idx[off];
  }
  // softmax backward over the K kept logits: g = a * sum_j a_j (da - da_j), without the cancellation of
  // a * (da - sum_j a_j da_j) when a ~ 1 (geoalign.routing.kept_softmax_backward); lanes past K hold a = 0
  Acc centred = Acc(0);
  for (int j = 0; j < K; ++j) {
    const Acc aj = __shfl_sync(kFullMask, a, group_base + j);
    const Acc daj = __shfl_sync(kFullMask, da, group_base + j);
    centred += aj * (da - daj);
  }
  const Acc g = a * centred;
  Acc out = Acc(0);
  for (int k = 0; k < K; ++k) {  // lane `sub` owns logit column `sub`: pick the slot routed to it, if any
    const Acc gk = __shfl_sync(kFullMask, g, group_base + k);
    const int64_t ik = __shfl_sync(kFullMask, idx, group_base + k);
    if (ik == sub) out = gk;
  }
  if (row_ok && sub < M) d_logits[row * M + sub] = from_acc<Acc, T>(out);
}

// ---------------------------------------------------------------------------------------------- bank row lists
// A stable counting sort of the P routed pairs by layer, in three launches (no atomics):
//   count : block b counts its tile's pairs per layer            -> ws[m * nblk + b]
//   scan  : one block turns ws into per-layer exclusive prefixes over blocks, and writes counts/offsets
//   place : block b recomputes its tile's in-block ranks and scatters token/slot ids to their final positions
constexpr int kRowsThreads = 512;  // one pair per thread; tile = kRowsThreads pairs
constexpr int kRowsWarps = kRowsThreads / 32;

// For the calling thread's pair (layer `m_self`, or -1): the number of pairs of each layer in each warp of the block
// (warp_counts[w][m]) and this thread's rank among its warp's pairs of the same layer.
__device__ __forceinline__ int tile_warp_counts(int m_self, int M, int (*warp_counts)[GEOALIGN_MAX_BANK_LAYERS]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lt_mask = (1u << lane) - 1u;
  int rank = 0;
  for (int m = 0; m < M; ++m) {
    const unsigned ballot = __ballot_sync(kFullMask, m_self == m);
    if (m_self == m) rank = __popc(ballot & lt_mask);
    if (lane == 0) warp_counts[warp][m] = __popc(ballot);
  }
  return rank;
}

__device__ __forceinline__ int pair_layer(const int64_t* topk_idx, int64_t p, int64_t P, int M) {
  if (p >= P) return -1;
  const int64_t m = topk_idx[p];
  return (m >= 0 && m < M) ? static_cast<int>(m) : -1;  // out-of-range ids are dropped (caller checks offsets[M])
}

__global__ void __launch_bounds__(kRowsThreads)
bank_rows_count_kernel(const int64_t* __restrict__ topk_idx, int64_t P, int M, int64_t nblk, int32_t* __restrict__ ws) {
  __shared__ int warp_counts[kRowsWarps][GEOALIGN_MAX_BANK_LAYERS];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRowsThreads + threadIdx.x;
  tile_warp_counts(pair_layer(topk_idx, p, P, M), M, warp_counts);
  __syncthreads();
  if (threadIdx.x < M) {
    int c = 0;
    for (int w = 0; w < kRowsWarps; ++w) c += warp_counts[w][threadIdx.x];
    ws[static_cast<int64_t>(threadIdx.x) * nblk + blockIdx.x] = c;
  }
}

// One block of 32 warps; warp m scans layer m's row of ws (in place, exclusive). P < 2^31 so int32 prefixes fit.
__global__ void __launch_bounds__(1024)
bank_rows_scan_kernel(int M, int64_t nblk, int32_t* __restrict__ ws, int64_t* __restrict__ counts,
                      int64_t* __restrict__ offsets) {
  __shared__ int64_t totals[GEOALIGN_MAX_BANK_LAYERS];
  const int lane = threadIdx.x & 31, m = threadIdx.x >> 5;
  if (m < M) {
    int32_t* row = ws + static_cast<int64_t>(m) * nblk;
    int carry = 0;
    for (int64_t base = 0; base < nblk; base += 32) {  // uniform trip count within the warp
      const int64_t j = base + lane;
      const int c = (j < nblk) ? row[j] : 0;
      int incl = c;
      for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += up;
      }
      if (j < nblk) row[j] = carry + incl - c;
      carry += __shfl_sync(kFullMask, incl, 31);
    }
    if (lane == 0) totals[m] = carry;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    offsets[0] = 0;
    for (int i = 0; i < M; ++i) {
      counts[i] = totals[i];
      acc += totals[i];
      offsets[i + 1] = acc;
    }
  }
}

__global__ void __launch_bounds__(kRowsThreads)
bank_rows_place_kernel(const int64_t* __restrict__ topk_idx, int64_t P, int K, int M, int64_t nblk,
                       const int32_t* __restrict__ ws, const int64_t* __restrict__ offsets,
                       int64_t* __restrict__ tokens, int64_t* __restrict__ slots) {
  __shared__ int warp_counts[kRowsWarps][GEOALIGN_MAX_BANK_LAYERS];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRowsThreads + threadIdx.x;
  const int m = pair_layer(topk_idx, p, P, M);
  const int rank_in_warp = tile_warp_counts(m, M, warp_counts);
  __syncthreads();
  if (m < 0) return;
  int rank = rank_in_warp;
  const int warp = threadIdx.x >> 5;
  for (int w = 0; w < warp; ++w) rank += warp_counts[w][m];
  const int64_t pos = offsets[m] + ws[static_cast<int64_t>(m) * nblk + blockIdx.x] + rank;
  tokens[pos] = p / K;
  slots[pos] = p % K;
}

}  // namespace
}  // namespace geoalign

using namespace geoalign;

extern "C" const char* geoalign_cuda_error_string(int err) {
  if (err == GEOALIGN_ERR_INVALID_ARGUMENT) return "geoalign: invalid argument to a CUDA launcher";
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

extern "C" int geoalign_route_topk_softmax(const void* logits, int logits_dtype, int64_t L, int M, int K,
                                           int64_t* topk_idx, void* alpha, void* stream) {
  if (L <= 0 || M < 1 || M > GEOALIGN_MAX_BANK_LAYERS || K < 1 || K > M || !logits || !topk_idx || !alpha)
    return GEOALIGN_ERR_INVALID_ARGUMENT;
  const int W = group_width(M);
  const int64_t warps = ceil_div(L, 32 / W);
  const int64_t blocks = ceil_div(warps * 32, kRouteThreads);
  if (blocks > INT_MAX) return GEOALIGN_ERR_INVALID_ARGUMENT;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(logits_dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    route_topk_softmax_kernel<T><<<static_cast<unsigned>(blocks), kRouteThreads, 0, s>>>(
        static_cast<const T*>(logits), L, M, K, W, topk_idx, static_cast<Acc*>(alpha));
    return last_launch_error();
  });
}

extern "C" int geoalign_route_backward(const void* d_alpha, const void* alpha, const int64_t* topk_idx,
                                       int logits_dtype, int64_t L, int M, int K, void* d_logits, void* stream) {
  if (L <= 0 || M < 1 || M > GEOALIGN_MAX_BANK_LAYERS || K < 1 || K > M || !d_alpha || !alpha || !topk_idx ||
      !d_logits)
    return GEOALIGN_ERR_INVALID_ARGUMENT;
  const int W = group_width(M);
  const int64_t warps = ceil_div(L, 32 / W);
  const int64_t blocks = ceil_div(warps * 32, kRouteThreads);
  if (blocks > INT_MAX) return GEOALIGN_ERR_INVALID_ARGUMENT;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(logits_dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    route_backward_kernel<T><<<static_cast<unsigned>(blocks), kRouteThreads, 0, s>>>(
        static_cast<const Acc*>(d_alpha), static_cast<const Acc*>(alpha), topk_idx, L, M, K, W,
        static_cast<T*>(d_logits));
    return last_launch_error();
  });
}

extern "C" int64_t geoalign_bank_rows_workspace_elems(int64_t P, int M) {
  return static_cast<int64_t>(M) * ceil_div(P > 0 ? P : 1, kRowsThreads);
}

extern "C" int geoalign_bank_rows(const int64_t* topk_idx, int64_t P, int K, int M, int64_t* tokens, int64_t* slots,
                                  int64_t* counts, int64_t* offsets, int32_t* workspace, void* stream) {
  if (P <= 0 || P > INT_MAX || K < 1 || M < 1 || M > GEOALIGN_MAX_BANK_LAYERS || !topk_idx || !tokens || !slots ||
      !counts || !offsets || !workspace)
    return GEOALIGN_ERR_INVALID_ARGUMENT;
  const int64_t nblk = ceil_div(P, kRowsThreads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  bank_rows_count_kernel<<<static_cast<unsigned>(nblk), kRowsThreads, 0, s>>>(topk_idx, P, M, nblk, workspace);
  int err = last_launch_error();
  if (err) return err;
  bank_rows_scan_kernel<<<1, 1024, 0, s>>>(M, nblk, workspace, counts, offsets);
  err = last_launch_error();
  if (err) return err;
  bank_rows_place_kernel<<<static_cast<unsigned>(nblk), kRowsThreads, 0, s>>>(topk_idx, P, K, M, nblk, workspace,
                                                                             offsets, tokens, slots);
  return last_launch_error();
}
