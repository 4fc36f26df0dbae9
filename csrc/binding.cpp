// Thin torch binding of the geoalign CUDA launchers (csrc/geoalign_cuda.h). It needs torch's C++ headers but no
// CUDA header: the caller (kernels/geoalign_kernels/cuda/ops.py) allocates every output, sets the device, and
// passes the current CUDA stream as an integer. The torch.library custom ops (autograd, torch.compile fake impls)
// are defined in Python on top of these functions, in that module.
//
// Built by setup.py's optional CUDAExtension "geoalign_kernels._cuda_ops", or JIT by torch.utils.cpp_extension
// (geoalign_kernels.cuda.extension.load_extension), together with csrc/*.cu.
#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "geoalign_cuda.h"

namespace {

int dtype_id(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return GEOALIGN_F32;
    case at::kHalf: return GEOALIGN_F16;
    case at::kBFloat16: return GEOALIGN_BF16;
    case at::kDouble: return GEOALIGN_F64;
    default: TORCH_CHECK(false, "geoalign cuda: ", name, " must be float32, float16, bfloat16 or float64, got ",
                         t.scalar_type());
  }
  return -1;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "geoalign cuda: ", what, " failed: ", geoalign_cuda_error_string(err));
}

void check_tensor(const at::Tensor& t, const char* name, const at::Device& device, bool contiguous = true) {
  TORCH_CHECK(t.is_cuda(), "geoalign cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "geoalign cuda: ", name, " is on ", t.device(), ", expected ", device);
  if (contiguous) TORCH_CHECK(t.is_contiguous(), "geoalign cuda: ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "geoalign cuda: ", name, " must be ", want, ", got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "geoalign cuda: ", name, " must have shape ", want, ", got ", t.sizes());
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// logits [L, M] -> topk_idx [L, K] int64, alpha [L, K] (float64 for float64 logits, else float32)
void route(const at::Tensor& logits, int64_t k, const at::Tensor& topk_idx, const at::Tensor& alpha,
           int64_t stream) {
  const auto dev = logits.device();
  check_tensor(logits, "logits", dev);
  check_tensor(topk_idx, "topk_idx", dev);
  check_tensor(alpha, "alpha", dev);
  TORCH_CHECK(logits.dim() == 2, "geoalign cuda: logits must be 2-D [L, M], got ", logits.sizes());
  const int64_t L = logits.size(0), M = logits.size(1);
  TORCH_CHECK(L >= 1, "geoalign cuda: logits has no rows");
  TORCH_CHECK(M >= 1 && M <= GEOALIGN_MAX_BANK_LAYERS, "geoalign cuda: routing handles 1..",
              GEOALIGN_MAX_BANK_LAYERS, " logits per row, got M=", M);
  TORCH_CHECK(k >= 1 && k <= M, "geoalign cuda: need 1 <= K <= M, got K=", k, ", M=", M);
  const int dt = dtype_id(logits, "logits");
  check_dtype(topk_idx, at::kLong, "topk_idx");
  check_dtype(alpha, acc_type(logits.scalar_type()), "alpha");
  check_shape(topk_idx, {L, k}, "topk_idx");
  check_shape(alpha, {L, k}, "alpha");
  check_launch(geoalign_route_topk_softmax(logits.data_ptr(), dt, L, static_cast<int>(M), static_cast<int>(k),
                                           topk_idx.data_ptr<int64_t>(), alpha.data_ptr(), as_stream(stream)),
               "route_topk_softmax");
}

// d_alpha, alpha [L, K] (accumulation dtype), topk_idx [L, K] int64 -> d_logits [L, M] (logits dtype)
void route_backward(const at::Tensor& d_alpha, const at::Tensor& alpha, const at::Tensor& topk_idx,
                    const at::Tensor& d_logits, int64_t stream) {
  const auto dev = alpha.device();
  check_tensor(d_alpha, "d_alpha", dev);
  check_tensor(alpha, "alpha", dev);
  check_tensor(topk_idx, "topk_idx", dev);
  check_tensor(d_logits, "d_logits", dev);
  TORCH_CHECK(alpha.dim() == 2 && d_logits.dim() == 2, "geoalign cuda: alpha and d_logits must be 2-D");
  const int64_t L = alpha.size(0), K = alpha.size(1), M = d_logits.size(1);
  TORCH_CHECK(L >= 1 && M >= 1 && M <= GEOALIGN_MAX_BANK_LAYERS && K >= 1 && K <= M,
              "geoalign cuda: route_backward needs L >= 1, 1 <= K <= M <= ", GEOALIGN_MAX_BANK_LAYERS);
  const int dt = dtype_id(d_logits, "d_logits");
  const auto acc = acc_type(d_logits.scalar_type());
  check_dtype(alpha, acc, "alpha");
  check_dtype(d_alpha, acc, "d_alpha");
  check_dtype(topk_idx, at::kLong, "topk_idx");
  check_shape(d_alpha, {L, K}, "d_alpha");
  check_shape(topk_idx, {L, K}, "topk_idx");
  check_shape(d_logits, {L, M}, "d_logits");
  check_launch(geoalign_route_backward(d_alpha.data_ptr(), alpha.data_ptr(), topk_idx.data_ptr<int64_t>(), dt, L,
                                       static_cast<int>(M), static_cast<int>(K), d_logits.data_ptr(),
                                       as_stream(stream)),
               "route_backward");
}

// topk_idx [L, K] int64 -> tokens, slots [L*K] int64, counts [M] int64, offsets [M+1] int64
void bank_rows(const at::Tensor& topk_idx, int64_t num_layers, const at::Tensor& tokens, const at::Tensor& slots,
               const at::Tensor& counts, const at::Tensor& offsets, int64_t stream) {
  const auto dev = topk_idx.device();
  for (auto* t : {&topk_idx, &tokens, &slots, &counts, &offsets}) {
    check_tensor(*t, "bank_rows tensor", dev);
    check_dtype(*t, at::kLong, "bank_rows tensor");
  }
  TORCH_CHECK(topk_idx.dim() == 2, "geoalign cuda: topk_idx must be 2-D [L, K]");
  const int64_t L = topk_idx.size(0), K = topk_idx.size(1), P = L * K;
  TORCH_CHECK(P >= 1 && P <= INT32_MAX, "geoalign cuda: bank_rows needs 1 <= L*K <= 2^31-1, got ", P);
  TORCH_CHECK(num_layers >= 1 && num_layers <= GEOALIGN_MAX_BANK_LAYERS, "geoalign cuda: bank_rows handles 1..",
              GEOALIGN_MAX_BANK_LAYERS, " layers, got ", num_layers);
  check_shape(tokens, {P}, "tokens");
  check_shape(slots, {P}, "slots");
  check_shape(counts, {num_layers}, "counts");
  check_shape(offsets, {num_layers + 1}, "offsets");
  // allocated on the current device and stream, which the caller made topk_idx's
  at::Tensor ws = at::empty({geoalign_bank_rows_workspace_elems(P, static_cast<int>(num_layers))},
                            topk_idx.options().dtype(at::kInt));
  check_launch(geoalign_bank_rows(topk_idx.data_ptr<int64_t>(), P, static_cast<int>(K), static_cast<int>(num_layers),
                                  tokens.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                  offsets.data_ptr<int64_t>(), ws.data_ptr<int32_t>(), as_stream(stream)),
               "bank_rows");
}

// layer [N, D'] (unit column stride), gather_index [L, G] int64 + tokens [n] int64 (or both None: layer rows are
// already packed, n*G of them), weight/bias [D'] (param dtype) -> x [n*G, D'] (param dtype), mean/rstd [n*G]
// (accumulation dtype; read instead of written when use_saved_stats), raw_out [n*G, D'] (layer dtype) or None.
void gather_layer_norm(const at::Tensor& layer, const std::optional<at::Tensor>& gather_index,
                       const std::optional<at::Tensor>& tokens, const at::Tensor& weight, const at::Tensor& bias,
                       double eps, bool use_saved_stats, int64_t group_size, const at::Tensor& x,
                       const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& raw_out,
                       int64_t stream) {
  const auto dev = layer.device();
  check_tensor(layer, "layer", dev, /*contiguous=*/false);
  TORCH_CHECK(layer.dim() == 2 && layer.stride(1) == 1, "geoalign cuda: layer must be 2-D [N, D'] with unit column "
              "stride, got sizes ", layer.sizes(), " strides ", layer.strides());
  const int64_t N = layer.size(0), D = layer.size(1);
  TORCH_CHECK(D >= 1, "geoalign cuda: layer rows are empty");
  const int in_dt = dtype_id(layer, "layer");
  const int out_dt = dtype_id(weight, "weight");
  const auto acc = acc_type(weight.scalar_type());
  check_tensor(weight, "weight", dev);
  check_tensor(bias, "bias", dev);
  check_tensor(x, "x", dev);
  check_tensor(mean, "mean", dev);
  check_tensor(rstd, "rstd", dev);
  check_dtype(bias, weight.scalar_type(), "bias");
  check_dtype(x, weight.scalar_type(), "x");
  check_dtype(mean, acc, "mean");
  check_dtype(rstd, acc, "rstd");
  check_shape(weight, {D}, "weight");
  check_shape(bias, {D}, "bias");
  TORCH_CHECK(group_size >= 1 && group_size <= INT32_MAX, "geoalign cuda: bad group size ", group_size);
  TORCH_CHECK(gather_index.has_value() == tokens.has_value(),
              "geoalign cuda: pass both gather_index and tokens, or neither");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == D, "geoalign cuda: x must be [rows, D'], got ", x.sizes());
  const int64_t R = x.size(0);
  TORCH_CHECK(R % group_size == 0, "geoalign cuda: x has ", R, " rows, not a multiple of G=", group_size);
  const int64_t n = R / group_size;
  check_shape(mean, {R}, "mean");
  check_shape(rstd, {R}, "rstd");
  const void* gather_ptr = nullptr;
  const int64_t* tokens_ptr = nullptr;
  int64_t gather_rows = 0, gsl = 0, gsg = 0;
  if (gather_index.has_value()) {
    const at::Tensor& gi = *gather_index;
    const at::Tensor& tk = *tokens;
    check_tensor(gi, "gather_index", dev, /*contiguous=*/false);
    check_tensor(tk, "tokens", dev);
    check_dtype(gi, at::kLong, "gather_index");
    check_dtype(tk, at::kLong, "tokens");
    TORCH_CHECK(gi.dim() == 2 && gi.size(1) == group_size, "geoalign cuda: gather_index must be [L, G=",
                group_size, "], got ", gi.sizes());
    check_shape(tk, {n}, "tokens");
    gather_ptr = gi.data_ptr();
    tokens_ptr = tk.data_ptr<int64_t>();
    gather_rows = gi.size(0);
    gsl = gi.stride(0);
    gsg = gi.stride(1);
  } else {
    TORCH_CHECK(N == R && layer.is_contiguous(), "geoalign cuda: without gather_index, layer must be the ", R,
                " packed contiguous rows");
  }
  void* raw_ptr = nullptr;
  if (raw_out.has_value()) {
    check_tensor(*raw_out, "raw_out", dev);
    check_dtype(*raw_out, layer.scalar_type(), "raw_out");
    check_shape(*raw_out, {R, D}, "raw_out");
    raw_ptr = raw_out->data_ptr();
  }
  if (R == 0) return;
  check_launch(geoalign_gather_layer_norm(layer.data_ptr(), in_dt, N, layer.stride(0), gather_ptr, GEOALIGN_I64,
                                          gather_rows, gsl, gsg, tokens_ptr, n, static_cast<int>(group_size), D,
                                          weight.data_ptr(), bias.data_ptr(), out_dt, eps, use_saved_stats ? 1 : 0,
                                          x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), raw_ptr, as_stream(stream)),
               "gather_layer_norm");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "geoalign CUDA kernels (raw launchers; the custom ops live in geoalign.backends.cuda_backend)";
  m.attr("max_bank_layers") = GEOALIGN_MAX_BANK_LAYERS;
  m.def("route", &route, "Top-K (ties -> lower index) + softmax over the K kept logits");
  m.def("route_backward", &route_backward, "d logits from d alpha (softmax backward over the kept logits)");
  m.def("bank_rows", &bank_rows, "per-bank-layer row lists: tokens, slots, counts, offsets (stable)");
  m.def("gather_layer_norm", &gather_layer_norm, "gather G patch rows per pair + per-layer LayerNorm");
}
