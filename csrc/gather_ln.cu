// Gather + per-layer LayerNorm of the G patch rows of the routed pairs into packed GEMM1 rows (docs/architecture.md, "Backends").
// CUDA toolkit only; see geoalign_cuda.h for the contract.
#include "common.cuh"

#include <limits.h>

namespace geoalign {
namespace {

constexpr int kLnWarps = 8;  // one warp per gathered row, 8 rows per block
constexpr int kLnThreads = kLnWarps * 32;

template <typename In, typename Out, int VEC>
__global__ void __launch_bounds__(kLnThreads)
gather_ln_kernel(const In* __restrict__ layer, int64_t N, int64_t row_stride, const int64_t* __restrict__ gather,
                 int64_t gather_rows, int64_t gather_stride_l, int64_t gather_stride_g,
                 const int64_t* __restrict__ tokens, int64_t R, int G, int64_t D, const Out* __restrict__ weight,
                 const Out* __restrict__ bias, typename AccOf<Out>::type eps, int use_saved_stats,
                 Out* __restrict__ x, typename AccOf<Out>::type* __restrict__ mean,
                 typename AccOf<Out>::type* __restrict__ rstd, In* __restrict__ raw_out) {
  using Acc = typename AccOf<Out>::type;
  using InVec = Vec<In, VEC>;
  using OutVec = Vec<Out, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (r >= R) return;  // warp-uniform: every lane of a warp works on the same row r

  int64_t src = r;  // rows already packed (recompute from the saved rows)
  bool ok = true;
  if (gather != nullptr) {
    const int64_t p = r / G;
    const int64_t g = r - p * G;
    const int64_t t = tokens[p];
    if (t < 0 || t >= gather_rows) {
      ok = false;
    } else {
      src = gather[t * gather_stride_l + g * gather_stride_g];
    }
  }
  ok = ok && src >= 0 && src < N;
  Out* __restrict__ xrow = x + r * D;
  if (!ok) {  // never read out of bounds: make the damage visible instead
    const Out bad = from_acc<Acc, Out>(acc_nan<Acc>());
    for (int64_t c = lane; c < D; c += 32) {
      xrow[c] = bad;
      if (raw_out != nullptr) raw_out[r * D + c] = convert<In, Out>(bad);
    }
    if (lane == 0 && !use_saved_stats) {
      mean[r] = acc_nan<Acc>();
      rstd[r] = acc_nan<Acc>();
    }
    return;
  }
  const In* __restrict__ row = layer + src * row_stride;

  Acc mu, rs;
  if (use_saved_stats) {
    mu = mean[r];
    rs = rstd[r];
  } else {
    // two passes over the row (the second from L1/L2): mean, then the biased variance around it
    Acc s = Acc(0);
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += 32 * VEC) {
      const InVec v = *reinterpret_cast<const InVec*>(row + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += to_acc<Acc>(convert<Out, In>(v.v[j]));
    }
    mu = warp_sum(s) / static_cast<Acc>(D);
    Acc q = Acc(0);
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += 32 * VEC) {
      const InVec v = *reinterpret_cast<const InVec*>(row + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const Acc d = to_acc<Acc>(convert<Out, In>(v.v[j])) - mu;
        q += d * d;
      }
    }
    rs = acc_rsqrt(warp_sum(q) / static_cast<Acc>(D) + eps);
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += 32 * VEC) {
    const InVec v = *reinterpret_cast<const InVec*>(row + c);
    const OutVec w = *reinterpret_cast<const OutVec*>(weight + c);
    const OutVec b = *reinterpret_cast<const OutVec*>(bias + c);
    OutVec o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Acc xh = (to_acc<Acc>(convert<Out, In>(v.v[j])) - mu) * rs;
      o.v[j] = from_acc<Acc, Out>(xh * to_acc<Acc>(w.v[j]) + to_acc<Acc>(b.v[j]));
    }
    *reinterpret_cast<OutVec*>(xrow + c) = o;
    if (raw_out != nullptr) *reinterpret_cast<InVec*>(raw_out + r * D + c) = v;
  }
}

template <typename In, typename Out, int VEC>
int launch_gather_ln(const void* layer, int64_t N, int64_t row_stride, const void* gather, int64_t gather_rows,
                     int64_t gsl, int64_t gsg, const int64_t* tokens, int64_t R, int G, int64_t D,
                     const void* weight, const void* bias, double eps, int use_saved, void* x, void* mean,
                     void* rstd, void* raw_out, cudaStream_t s) {
  using Acc = typename AccOf<Out>::type;
  const int64_t blocks = ceil_div(R, kLnWarps);
  if (blocks > INT_MAX) return GEOALIGN_ERR_INVALID_ARGUMENT;
  gather_ln_kernel<In, Out, VEC><<<static_cast<unsigned>(blocks), kLnThreads, 0, s>>>(
      static_cast<const In*>(layer), N, row_stride, static_cast<const int64_t*>(gather), gather_rows, gsl, gsg, tokens,
      R, G, D, static_cast<const Out*>(weight), static_cast<const Out*>(bias), static_cast<Acc>(eps), use_saved,
      static_cast<Out*>(x), static_cast<Acc*>(mean), static_cast<Acc*>(rstd), static_cast<In*>(raw_out));
  return last_launch_error();
}

}  // namespace
}  // namespace geoalign

using namespace geoalign;

extern "C" int geoalign_gather_layer_norm(const void* layer, int in_dtype, int64_t N, int64_t row_stride,
                                          const void* gather, int index_type, int64_t gather_rows,
                                          int64_t gather_stride_l, int64_t gather_stride_g, const int64_t* tokens,
                                          int64_t n, int G, int64_t D, const void* weight, const void* bias,
                                          int out_dtype, double eps, int use_saved_stats, void* x, void* mean,
                                          void* rstd, void* raw_out, void* stream) {
  const int in_size = dtype_size(in_dtype), out_size = dtype_size(out_dtype);
  if (in_size == 0 || out_size == 0 || n < 0 || G < 1 || D < 1 || N < 0 || row_stride < D || !layer || !weight ||
      !bias || !x || !mean || !rstd || !(eps >= 0.0))
    return GEOALIGN_ERR_INVALID_ARGUMENT;
  if (gather != nullptr && (!tokens || gather_rows < 0 || index_type != GEOALIGN_I64))
    return GEOALIGN_ERR_INVALID_ARGUMENT;
  if (n == 0) return 0;
  if (n > INT64_MAX / G) return GEOALIGN_ERR_INVALID_ARGUMENT;
  const int64_t R = n * G;
  if (gather == nullptr && N < R) return GEOALIGN_ERR_INVALID_ARGUMENT;  // packed rows: one source row per row
  // 16-byte loads of the layer rows when every pointer and row start is aligned for them; else one element a lane
  const int vec = 16 / in_size;
  const bool vector_ok = D % vec == 0 && row_stride % vec == 0 && is_aligned(layer, 16) &&
                         is_aligned(raw_out, 16) && is_aligned(x, static_cast<uintptr_t>(out_size) * vec) &&
                         is_aligned(weight, static_cast<uintptr_t>(out_size) * vec) &&
                         is_aligned(bias, static_cast<uintptr_t>(out_size) * vec);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t gsl = gather_stride_l, gsg = gather_stride_g;
  return dispatch_dtype(in_dtype, [&](auto in_tag) -> int {
    using In = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) -> int {
      using Out = decltype(out_tag);
      constexpr int V = 16 / sizeof(In);
      return vector_ok ? launch_gather_ln<In, Out, V>(layer, N, row_stride, gather, gather_rows, gsl, gsg, tokens, R,
                                                      G, D, weight, bias, eps, use_saved_stats, x, mean, rstd,
                                                      raw_out, s)
                       : launch_gather_ln<In, Out, 1>(layer, N, row_stride, gather, gather_rows, gsl, gsg, tokens, R,
                                                      G, D, weight, bias, eps, use_saved_stats, x, mean, rstd,
                                                      raw_out, s);
    });
  });
}
