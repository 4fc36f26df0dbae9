// LayerNorm backward of the gathered rows: d gamma / d beta as per-block partials, reduced by the caller
// (docs/architecture.md, "Backends"; no atomics, deterministic). No gradient flows into the frozen geometry rows.
// CUDA toolkit only; see geoalign_cuda.h for the contract.
#include "common.cuh"

#include <limits.h>

namespace geoalign {
namespace {

constexpr int kBwdThreads = 256;

template <typename In, typename Out, int VEC>
__global__ void __launch_bounds__(kBwdThreads)
ln_backward_partials_kernel(const Out* __restrict__ dx, const In* __restrict__ raw,
                            const typename AccOf<Out>::type* __restrict__ mean,
                            const typename AccOf<Out>::type* __restrict__ rstd, int64_t R, int64_t D,
                            int64_t rows_per_block, typename AccOf<Out>::type* __restrict__ dgamma_part,
                            typename AccOf<Out>::type* __restrict__ dbeta_part) {
  using Acc = typename AccOf<Out>::type;
  using InVec = Vec<In, VEC>;
  using OutVec = Vec<Out, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x) * VEC;
  if (c >= D) return;  // D % VEC == 0, so a thread owns VEC whole columns or none
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = (r0 + rows_per_block < R) ? r0 + rows_per_block : R;
  Acc sg[VEC], sb[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sg[j] = sb[j] = Acc(0);
  for (int64_t r = r0; r < r1; ++r) {  // rows in order: a fixed summation order, so the result is deterministic
    const Acc mu = mean[r], rs = rstd[r];
    const OutVec d = *reinterpret_cast<const OutVec*>(dx + r * D + c);
    const InVec v = *reinterpret_cast<const InVec*>(raw + r * D + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Acc dv = to_acc<Acc>(d.v[j]);
      const Acc xh = (to_acc<Acc>(convert<Out, In>(v.v[j])) - mu) * rs;
      sg[j] += dv * xh;
      sb[j] += dv;
    }
  }
  const int64_t out = static_cast<int64_t>(blockIdx.y) * D + c;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    dgamma_part[out + j] = sg[j];
    dbeta_part[out + j] = sb[j];
  }
}

}  // namespace
}  // namespace geoalign

using namespace geoalign;

extern "C" int64_t geoalign_ln_backward_num_blocks(int64_t R, int64_t rows_per_block) {
  if (R <= 0 || rows_per_block <= 0) return 0;
  return ceil_div(R, rows_per_block);
}

extern "C" int geoalign_layer_norm_backward_partials(const void* dx, const void* raw, int in_dtype, int out_dtype,
                                                     const void* mean, const void* rstd, int64_t R, int64_t D,
                                                     int64_t rows_per_block, void* dgamma_part, void* dbeta_part,
                                                     void* stream) {
  const int in_size = dtype_size(in_dtype), out_size = dtype_size(out_dtype);
  if (in_size == 0 || out_size == 0 || R < 1 || D < 1 || rows_per_block < 1 || !dx || !raw || !mean || !rstd ||
      !dgamma_part || !dbeta_part)
    return GEOALIGN_ERR_INVALID_ARGUMENT;
  const int64_t nblk = ceil_div(R, rows_per_block);
  if (nblk > 65535) return GEOALIGN_ERR_INVALID_ARGUMENT;  // gridDim.y limit; pick a larger rows_per_block
  const int vec = 16 / in_size;
  const bool vector_ok = D % vec == 0 && is_aligned(raw, 16) &&
                         is_aligned(dx, static_cast<uintptr_t>(out_size) * vec);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(in_dtype, [&](auto in_tag) -> int {
    using In = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) -> int {
      using Out = decltype(out_tag);
      using Acc = typename AccOf<Out>::type;
      constexpr int V = 16 / sizeof(In);
      const int v = vector_ok ? V : 1;
      const int64_t gx = ceil_div(ceil_div(D, v), kBwdThreads);
      if (gx > INT_MAX) return GEOALIGN_ERR_INVALID_ARGUMENT;
      const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(nblk));
      if (vector_ok) {
        ln_backward_partials_kernel<In, Out, V><<<grid, kBwdThreads, 0, s>>>(
            static_cast<const Out*>(dx), static_cast<const In*>(raw), static_cast<const Acc*>(mean),
            static_cast<const Acc*>(rstd), R, D, rows_per_block, static_cast<Acc*>(dgamma_part),
            static_cast<Acc*>(dbeta_part));
      } else {
        ln_backward_partials_kernel<In, Out, 1><<<grid, kBwdThreads, 0, s>>>(
            static_cast<const Out*>(dx), static_cast<const In*>(raw), static_cast<const Acc*>(mean),
            static_cast<const Acc*>(rstd), R, D, rows_per_block, static_cast<Acc*>(dgamma_part),
            static_cast<Acc*>(dbeta_part));
      }
      return last_launch_error();
    });
  });
}
