// geoalign CUDA kernels: the plain-C launch interface.
//
// The kernels (csrc/*.cu) need only the CUDA toolkit; this header needs nothing at all (no CUDA, no torch), so the
// torch-facing binding (csrc/binding.cpp) includes it and can be compiled without the CUDA headers, and CI can
// compile every .cu file for sm_90 on a machine whose torch is a CPU build (.ci/check_csrc).
//
// Conventions for every launcher:
//   * pointers are device pointers; tensors are dense row-major unless a stride argument says otherwise;
//   * `stream` is a cudaStream_t passed as void* (0 = the legacy default stream);
//   * the return value is a cudaError_t as int (0 = success); geoalign_cuda_error_string() turns it into text;
//   * invalid arguments return GEOALIGN_ERR_INVALID_ARGUMENT before anything is launched.
#ifndef GEOALIGN_CUDA_H_
#define GEOALIGN_CUDA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types (ids shared with the binding).
enum GeoalignDtype {
  GEOALIGN_F32 = 0,
  GEOALIGN_F16 = 1,
  GEOALIGN_BF16 = 2,
  GEOALIGN_F64 = 3,
};

// Index types of gather_index.
enum GeoalignIndex {
  GEOALIGN_I32 = 0,
  GEOALIGN_I64 = 1,
};

// Not a cudaError_t value (those are < 1000 in every toolkit so far).
#define GEOALIGN_ERR_INVALID_ARGUMENT 10001

// The largest bank the warp-level router handles (one logit per lane).
#define GEOALIGN_MAX_BANK_LAYERS 32

const char* geoalign_cuda_error_string(int err);

// ---------------------------------------------------------------------------------------------- routing.cu
// Top-K over the M <= 32 logits of each of the L rows, descending, ties -> lower index (NaN ranks above every
// number, as torch.sort does), then alpha = softmax over the K kept logits.
//   logits    [L, M] in logits_dtype (contiguous)
//   topk_idx  [L, K] int64 out
//   alpha     [L, K] out: double when logits_dtype is F64, else float (the math is done in that type)
int geoalign_route_topk_softmax(const void* logits, int logits_dtype, int64_t L, int M, int K, int64_t* topk_idx,
                                void* alpha, void* stream);

// dS = d logits [L, M] (logits_dtype, fully written: 0 off the Top-K) from d alpha [L, K] (alpha's dtype):
//   dS[l, topk_idx[l, k]] = alpha[l, k] * (d_alpha[l, k] - sum_j alpha[l, j] * d_alpha[l, j])
int geoalign_route_backward(const void* d_alpha, const void* alpha, const int64_t* topk_idx, int logits_dtype,
                            int64_t L, int M, int K, void* d_logits, void* stream);

// Per-bank-layer row lists of the P = L*K routed pairs (p = l*K + k routed to layer topk_idx[l, k]):
//   counts  [M] int64, offsets [M+1] int64 (exclusive prefix sum of counts),
//   tokens  [P] int64 (p / K) and slots [P] int64 (p % K), grouped by layer, p ascending within a layer (a stable
//   counting sort, so the same order as geoalign.routing.bank_rows). Deterministic, no atomics.
//   Pairs whose layer id is outside [0, M) are dropped; the caller detects that as offsets[M] < P.
//   workspace: geoalign_bank_rows_workspace_elems(P, M) int32 elements.
int64_t geoalign_bank_rows_workspace_elems(int64_t P, int M);
int geoalign_bank_rows(const int64_t* topk_idx, int64_t P, int K, int M, int64_t* tokens, int64_t* slots,
                       int64_t* counts, int64_t* offsets, int32_t* workspace, void* stream);

// ---------------------------------------------------------------------------------------------- gather_ln.cu
// Gather + per-layer LayerNorm of the G patch rows of n routed pairs into packed GEMM1 rows.
// Row r = p*G + g (r < n*G) reads source row
//     src = gather[tokens[p] * gather_stride_l + g * gather_stride_g]   (gather != NULL; gather has gather_rows
//                                                                       rows, tokens[p] must be in [0, gather_rows)), or
//     src = r                                                         (gather == NULL: rows already packed)
// of `layer` ([N, D] in in_dtype, row stride `row_stride` elements, unit column stride), rounds each element to
// out_dtype (as `layer.to(param_dtype)` would), and writes
//     x[r, :] = (v - mean_r) * rstd_r * weight + bias          x: [n*G, D] == [n, G*D] in out_dtype
// with mean/rstd in the accumulation type (double for out_dtype F64, else float):
//     use_saved_stats == 0: two-pass mean and biased variance, rstd = 1/sqrt(var + eps); both written to mean/rstd
//     use_saved_stats != 0: read from mean/rstd (bit-identical recompute of a forward from its saved rows)
// raw_out (optional, may be NULL): [n*G, D] in in_dtype, the gathered rows unchanged (what backward needs).
// A token outside [0, gather_rows) or a source row outside [0, N) is never read: its x row (and raw_out row, and
// the stats unless saved ones are used) are NaN.
int geoalign_gather_layer_norm(const void* layer, int in_dtype, int64_t N, int64_t row_stride, const void* gather,
                               int index_type, int64_t gather_rows, int64_t gather_stride_l, int64_t gather_stride_g,
                               const int64_t* tokens, int64_t n, int G, int64_t D, const void* weight,
                               const void* bias, int out_dtype, double eps, int use_saved_stats, void* x,
                               void* mean, void* rstd, void* raw_out, void* stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // GEOALIGN_CUDA_H_
