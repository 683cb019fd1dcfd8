// Fused CPU Memory Layer: hashing, weights, gather-sum and backward (spec section 1).
//
// Shapes: N tokens, K chunks (tables), T = tau bits, R = 2^tau rows, D = d_out.
// The work is a gather bound by memory bandwidth. A thread owns a range of
// tokens (forward) or whole tables (backward), so no two threads write the same
// value, and every reduction runs in a fixed order: results are bit-identical
// run to run and no atomics are needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// codes[n, k] = sum_i [z_i >= 0] 2^i ; p[n, k] = prod_i sigmoid(2 |z_i| / t)  (times sum |z_i| for l1)
template <typename scalar_t>
void hash_kernel(const scalar_t* x, int64_t n_tokens, int64_t chunks, int64_t tau, float temperature, bool l1,
                 int16_t* codes, float* p) {
  const float scale = 2.0f / temperature;
  at::parallel_for(0, n_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = x + n * chunks * tau;
      for (int64_t k = 0; k < chunks; ++k) {
        const scalar_t* z = row + k * tau;
        int32_t code = 0;
        float denominator = 1.0f, magnitude = 0.0f;
        for (int64_t i = 0; i < tau; ++i) {
          const float v = to_float(z[i]);
          const float a = std::fabs(v);
          code |= (v >= 0.0f) << i;
          denominator *= 1.0f + std::exp(-scale * a);   // sigmoid(s a) = 1 / (1 + exp(-s a)); at most 2^tau
          magnitude += a;
        }
        codes[n * chunks + k] = static_cast<int16_t>(code);
        p[n * chunks + k] = (l1 ? magnitude : 1.0f) / denominator;
      }
    }
  });
}

// dz_i = dp * dp/dz_i. Paper weighting: dp/dz_i = p (2/t) sign(z_i) (1 - sigmoid(2|z_i|/t)).
// l1 weighting, p = p0 m with m = sum |z|: dp/dz_i = sign(z_i) p0 ((2/t)(1 - sigmoid(2|z_i|/t)) m + 1).
template <typename scalar_t>
void hash_backward_kernel(const scalar_t* x, const float* p, const float* dp, int64_t n_tokens, int64_t chunks,
                          int64_t tau, float temperature, bool l1, scalar_t* dx) {
  const float scale = 2.0f / temperature;
  at::parallel_for(0, n_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < chunks; ++k) {
        const scalar_t* z = x + (n * chunks + k) * tau;
        scalar_t* out = dx + (n * chunks + k) * tau;
        const float pk = p[n * chunks + k], g = dp[n * chunks + k];
        float magnitude = 0.0f;
        if (l1) {
          for (int64_t i = 0; i < tau; ++i) magnitude += std::fabs(to_float(z[i]));
        }
        const float p0 = l1 ? (magnitude > 0.0f ? pk / magnitude : 0.0f) : pk;
        for (int64_t i = 0; i < tau; ++i) {
          const float v = to_float(z[i]);
          const float sign = (v > 0.0f) - (v < 0.0f);
          const float rest = 1.0f - 1.0f / (1.0f + std::exp(-scale * std::fabs(v)));   // 1 - sigmoid(2|z|/t)
          const float slope = l1 ? p0 * (scale * rest * magnitude + 1.0f) : p0 * scale * rest;
          out[i] = static_cast<scalar_t>(g * sign * slope);
        }
      }
    }
  });
}

// y[n, :] = bias + sum_k p[n, k] * tables[k, codes[n, k], :]
// A thread owns a range of tokens and accumulates each output row in fp32, table by table. Blocking columns to
// keep table slices in L2 was measured slower here: rows sit 4 * d_out bytes apart (a power of two), so the
// slices of many rows fall into few cache sets and evict each other.
template <typename scalar_t>
void gather_sum_kernel(const int16_t* codes, const float* p, const scalar_t* tables, const scalar_t* bias,
                       int64_t n_tokens, int64_t chunks, int64_t rows, int64_t width, scalar_t* y) {
  at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(width);
    for (int64_t n = begin; n < end; ++n) {
      float* __restrict__ out = acc.data();
      for (int64_t j = 0; j < width; ++j) out[j] = bias ? to_float(bias[j]) : 0.0f;
      for (int64_t k = 0; k < chunks; ++k) {
        const scalar_t* __restrict__ src = tables + (k * rows + codes[n * chunks + k]) * width;
        const float pk = p[n * chunks + k];
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) out[j] += pk * to_float(src[j]);
      }
      scalar_t* dst = y + n * width;
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(out[j]);
    }
  });
}

// dtables[k, r, :] = sum_{n: codes[n,k] = r} p[n,k] dy[n, :]   (fp32, tokens in ascending order)
// dp[n, k] = <dy[n, :], tables[k, codes[n, k], :]>
// A thread owns whole tables, so no two threads write the same row and no atomics are needed.
template <typename scalar_t>
void gather_sum_backward_kernel(const scalar_t* dy, const int16_t* codes, const float* p, const scalar_t* tables,
                                int64_t n_tokens, int64_t chunks, int64_t rows, int64_t width,
                                float* dtables, float* dp) {
  at::parallel_for(0, chunks, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      float* dtable = dtables + k * rows * width;
      const scalar_t* table = tables + k * rows * width;
      for (int64_t n = 0; n < n_tokens; ++n) {
        const int64_t r = codes[n * chunks + k];
        const float pk = p[n * chunks + k];
        const scalar_t* g = dy + n * width;
        const scalar_t* src = table + r * width;
        float* dst = dtable + r * width;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < width; ++j) {
          const float gj = to_float(g[j]);
          dot += gj * to_float(src[j]);
          dst[j] += pk * gj;
        }
        dp[n * chunks + k] = dot;
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
}

}  // namespace

std::vector<torch::Tensor> hash(torch::Tensor x, int64_t tau, double temperature, bool l1) {
  check(x, "x", 2);
  TORCH_CHECK(x.size(1) % tau == 0, "input width ", x.size(1), " is not a multiple of tau=", tau);
  TORCH_CHECK(tau <= 15, "tau must be at most 15 for int16 codes");
  const int64_t n = x.size(0), chunks = x.size(1) / tau;
  auto codes = torch::empty({n, chunks}, x.options().dtype(torch::kInt16));
  auto p = torch::empty({n, chunks}, x.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "megamem_hash", [&] {
    hash_kernel<scalar_t>(x.data_ptr<scalar_t>(), n, chunks, tau, (float)temperature, l1,
                          codes.data_ptr<int16_t>(), p.data_ptr<float>());
  });
  return {codes, p};
}

torch::Tensor hash_backward(torch::Tensor x, torch::Tensor p, torch::Tensor dp, int64_t tau, double temperature, bool l1) {
  check(x, "x", 2);
  check(p, "p", 2);
  check(dp, "dp", 2);
  const int64_t n = x.size(0), chunks = x.size(1) / tau;
  auto dx = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "megamem_hash_backward", [&] {
    hash_backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), p.data_ptr<float>(), dp.data_ptr<float>(), n, chunks, tau,
                                   (float)temperature, l1, dx.data_ptr<scalar_t>());
  });
  return dx;
}

torch::Tensor gather_sum(torch::Tensor codes, torch::Tensor p, torch::Tensor tables, c10::optional<torch::Tensor> bias) {
  check(codes, "codes", 2);
  check(p, "p", 2);
  check(tables, "tables", 3);
  TORCH_CHECK(codes.scalar_type() == torch::kInt16 && p.scalar_type() == torch::kFloat32, "codes int16, p float32");
  const int64_t n = codes.size(0), chunks = tables.size(0), rows = tables.size(1), width = tables.size(2);
  TORCH_CHECK(codes.size(1) == chunks && p.sizes() == codes.sizes(), "codes and p must be [N, K] with K = tables.size(0)");
  auto y = torch::empty({n, width}, tables.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, tables.scalar_type(), "megamem_gather_sum", [&] {
    const scalar_t* b = nullptr;
    if (bias.has_value()) {
      check(*bias, "bias", 1);
      b = bias->data_ptr<scalar_t>();
    }
    gather_sum_kernel<scalar_t>(codes.data_ptr<int16_t>(), p.data_ptr<float>(), tables.data_ptr<scalar_t>(), b,
                                n, chunks, rows, width, y.data_ptr<scalar_t>());
  });
  return y;
}

std::vector<torch::Tensor> gather_sum_backward(torch::Tensor dy, torch::Tensor codes, torch::Tensor p, torch::Tensor tables) {
  check(dy, "dy", 2);
  check(codes, "codes", 2);
  check(p, "p", 2);
  check(tables, "tables", 3);
  TORCH_CHECK(dy.scalar_type() == tables.scalar_type(), "dy and tables must share a dtype");
  const int64_t n = codes.size(0), chunks = tables.size(0), rows = tables.size(1), width = tables.size(2);
  auto dtables = torch::zeros({chunks, rows, width}, tables.options().dtype(torch::kFloat32));
  auto dp = torch::empty({n, chunks}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, tables.scalar_type(), "megamem_gather_sum_backward", [&] {
    gather_sum_backward_kernel<scalar_t>(dy.data_ptr<scalar_t>(), codes.data_ptr<int16_t>(), p.data_ptr<float>(),
                                         tables.data_ptr<scalar_t>(), n, chunks, rows, width,
                                         dtables.data_ptr<float>(), dp.data_ptr<float>());
  });
  return {dtables, dp};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hash", &hash, "codes and p of every chunk");
  m.def("hash_backward", &hash_backward, "gradient of the input from the gradient of p");
  m.def("gather_sum", &gather_sum, "weighted sum of retrieved rows");
  m.def("gather_sum_backward", &gather_sum_backward, "table gradients (fp32) and the gradient of p");
}
