// Device helpers shared by the geoalign kernels: element types, conversions that round exactly as torch's
// `.to(dtype)` does, warp reductions and a 16-byte vector type. CUDA toolkit only (no torch).
#ifndef GEOALIGN_COMMON_CUH_
#define GEOALIGN_COMMON_CUH_

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <stdint.h>
#include <type_traits>

#include "geoalign_cuda.h"

namespace geoalign {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: double for double parameters, float otherwise (as geoalign.backends.torch_sparse).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<double>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ double to_f64(T v) {
  if constexpr (std::is_same<T, double>::value) {
    return v;
  } else {
    return static_cast<double>(to_f32<T>(v));  // exact: every float/half/bf16 is a double
  }
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_f32<double>(float v) { return static_cast<double>(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round `v` to Out the way torch's `.to(Out)` does: directly for double, through float otherwise (c10::Half and
// c10::BFloat16 are constructed from float, so double -> half rounds through float in torch too).
template <typename Out, typename In> __device__ __forceinline__ Out convert(In v) {
  if constexpr (std::is_same<Out, In>::value) {
    return v;
  } else if constexpr (std::is_same<Out, double>::value) {
    return to_f64<In>(v);
  } else {
    return from_f32<Out>(to_f32<In>(v));
  }
}

// Widen to the accumulation type (exact).
template <typename Acc, typename T> __device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (std::is_same<Acc, double>::value) {
    return to_f64<T>(v);
  } else {
    return to_f32<T>(v);
  }
}

template <typename Acc, typename T> __device__ __forceinline__ T from_acc(Acc v) {
  if constexpr (std::is_same<Acc, double>::value) {
    return convert<T, double>(v);
  } else {
    return from_f32<T>(v);
  }
}

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_rsqrt(float v) { return 1.0f / sqrtf(v); }  // IEEE sqrt and division
__device__ __forceinline__ double acc_rsqrt(double v) { return 1.0 / sqrt(v); }
__device__ __forceinline__ bool acc_isnan(float v) { return isnan(v); }
__device__ __forceinline__ bool acc_isnan(double v) { return isnan(v); }
template <typename Acc> __device__ __forceinline__ Acc acc_nan();
template <> __device__ __forceinline__ float acc_nan<float>() { return __int_as_float(0x7fffffff); }
template <> __device__ __forceinline__ double acc_nan<double>() { return __longlong_as_double(0x7fffffffffffffffLL); }

// Sum over the 32 lanes of a warp; every lane gets the result. All 32 lanes must call it.
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// N elements loaded/stored as one (up to 16-byte, or two for 32) transaction; needs sizeof(T)*N alignment.
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

inline int dtype_size(int dtype) {
  switch (dtype) {
    case GEOALIGN_F32: return 4;
    case GEOALIGN_F16: return 2;
    case GEOALIGN_BF16: return 2;
    case GEOALIGN_F64: return 8;
    default: return 0;
  }
}

// Calls f(T{}) with T the C++ type of `dtype`; returns GEOALIGN_ERR_INVALID_ARGUMENT for an unknown id.
template <typename F> inline int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case GEOALIGN_F32: return f(float{});
    case GEOALIGN_F16: return f(__half{});
    case GEOALIGN_BF16: return f(__nv_bfloat16{});
    case GEOALIGN_F64: return f(double{});
    default: return GEOALIGN_ERR_INVALID_ARGUMENT;
  }
}

inline int last_launch_error() { return static_cast<int>(cudaGetLastError()); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace geoalign

#endif  // GEOALIGN_COMMON_CUH_
