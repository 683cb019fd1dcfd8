// Hashing and weights of the CPU Memory Layer, and the input's gradient (docs/model.md, "The Memory Layer").
//
// Per token, the exponentials exp(-2|z|/t) of the whole row are computed eight at a time; a chunk's code and
// its weight p = prod_i sigmoid(2|z_i|/t) = 1 / prod_i (1 + exp(-2|z_i|/t)) are then read off them, eight
// chunks at a time: lane j of a vector works chunk j, and step i reads bit i of all eight (for the paper's
// tau = 8, a transpose of eight whole vectors; otherwise, and for a last group of fewer chunks, a gather).
#include "memory_layer.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace megamem {
namespace {

// e[i] = exp(-scale |z[i]|) for a row of `width` floats.
void row_exponentials(const float* z, int64_t width, float scale, float* e) {
  int64_t i = 0;
  for (; i + kLanes <= width; i += kLanes) store(e + i, exp_negative(abs(load(z + i)) * scale));
  for (; i < width; ++i) e[i] = std::exp(-scale * std::fabs(z[i]));
}

// A token's row as floats: the input itself when it is float, else converted into `buffer`.
template <typename T>
const float* row_as_floats(const T* row, int64_t width, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    load_floats(row, width, buffer.data());
    return buffer.data();
  }
}

template <typename T>
void hash_kernel(const T* x, int64_t tokens, int64_t chunks, int64_t tau, float temperature, bool l1,
                 int16_t* codes, float* p) {
  const float scale = 2.0f / temperature;
  const int64_t width = chunks * tau;
  const IntVec stride = IntVec{0, 1, 2, 3, 4, 5, 6, 7} * static_cast<int32_t>(tau);
  IntVec last_group;                                // a last group of fewer than eight chunks repeats its last one
  for (int j = 0; j < kLanes; ++j) last_group[j] = static_cast<int32_t>(std::min<int64_t>(j, (chunks + kLanes - 1) % kLanes) * tau);
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> converted(width), e(width);
    for (int64_t n = begin; n < end; ++n) {
      const float* z = row_as_floats(x + n * width, width, converted);
      row_exponentials(z, width, scale, e.data());
      int64_t k = 0;
      if (tau == kLanes && !l1) {                    // the paper's tau = 8: one chunk per vector, eight chunks at once
        const Vec bit = {1, 2, 4, 8, 16, 32, 64, 128};
        for (; k + kLanes <= chunks; k += kLanes) {
          Vec bits[kLanes], q[kLanes];
          for (int j = 0; j < kLanes; ++j) {
            bits[j] = load(z + (k + j) * kLanes) >= 0.0f ? bit : splat(0.0f);
            q[j] = load(e.data() + (k + j) * kLanes) + 1.0f;
          }
          const Vec code = reduce_eight(bits, [](Vec a, Vec b) { return a + b; });      // exact: integers below 256
          store(p + n * chunks + k, 1.0f / reduce_eight(q, [](Vec a, Vec b) { return a * b; }));
          for (int j = 0; j < kLanes; ++j) codes[n * chunks + k + j] = static_cast<int16_t>(code[j]);
        }
      }
      // Any tau or weighting: bit i of `lanes` chunks from `first` on, at the offsets `index` (tau apart).
      const auto hash_group = [&](int64_t first, int64_t lanes, IntVec index) {
        IntVec code = {};
        Vec denominator = splat(1.0f), magnitude = {};
        for (int64_t i = 0; i < tau; ++i) {
          const Vec v = gather(z + first * tau + i, index), ei = gather(e.data() + first * tau + i, index);
          code |= (v >= 0.0f) & (1 << i);
          denominator *= ei + 1.0f;                  // at most 2^tau
          magnitude += abs(v);
        }
        const Vec weight = (l1 ? magnitude : splat(1.0f)) / denominator;
        if (lanes == kLanes) store(p + n * chunks + first, weight);
        for (int j = 0; j < lanes; ++j) {
          codes[n * chunks + first + j] = static_cast<int16_t>(code[j]);
          if (lanes < kLanes) p[n * chunks + first + j] = weight[j];
        }
      };
      for (; k + kLanes <= chunks; k += kLanes) hash_group(k, kLanes, stride);
      if (k < chunks) hash_group(k, chunks - k, last_group);
    }
  });
}

// dz_i = dp * dp/dz_i = sign(z_i) (A rest_i + B), rest_i = 1 - sigmoid(s|z_i|) = e_i / (1 + e_i), s = 2/t.
// Paper weighting: dp/dz_i = p s sign(z_i) rest_i, so A = dp p s and B = 0.
// l1 weighting, p = p0 m with m = sum |z|: dp/dz_i = sign(z_i) p0 (s rest_i m + 1), so A = dp p s, B = dp p0.
template <typename T>
void hash_backward_kernel(const T* x, const float* p, const float* dp, int64_t tokens, int64_t chunks, int64_t tau,
                          float temperature, bool l1, T* dx) {
  const float scale = 2.0f / temperature;
  const int64_t width = chunks * tau;
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> converted(width), e(width), slope(width), offset(width, 0.0f), out(width);
    for (int64_t n = begin; n < end; ++n) {
      const float* z = row_as_floats(x + n * width, width, converted);
      row_exponentials(z, width, scale, e.data());
      for (int64_t k = 0; k < chunks; ++k) {
        const float pk = p[n * chunks + k], g = dp[n * chunks + k];
        float b = 0.0f;
        if (l1) {
          float magnitude = 0.0f;
          for (int64_t i = 0; i < tau; ++i) magnitude += std::fabs(z[k * tau + i]);
          b = magnitude > 0.0f ? g * pk / magnitude : 0.0f;
        }
        for (int64_t i = 0; i < tau; ++i) {
          slope[k * tau + i] = g * pk * scale;
          offset[k * tau + i] = b;
        }
      }
      int64_t i = 0;
      for (; i + kLanes <= width; i += kLanes) {
        const Vec v = load(z + i), ei = load(e.data() + i);
        const Vec sign = (v > 0.0f ? splat(1.0f) : splat(0.0f)) - (v < 0.0f ? splat(1.0f) : splat(0.0f));
        store(out.data() + i, sign * (load(slope.data() + i) * (ei / (ei + 1.0f)) + load(offset.data() + i)));
      }
      for (; i < width; ++i) {
        const float sign = (z[i] > 0.0f) - (z[i] < 0.0f);
        out[i] = sign * (slope[i] * (e[i] / (e[i] + 1.0f)) + offset[i]);
      }
      store_floats(out.data(), width, dx + n * width);
    }
  });
}

}  // namespace

std::vector<at::Tensor> hash(const at::Tensor& x, int64_t tau, double temperature, bool l1) {
  const int64_t tokens = x.size(0), chunks = x.size(1) / tau;
  auto codes = at::empty({tokens, chunks}, x.options().dtype(at::kShort));
  auto p = at::empty({tokens, chunks}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), "hash", [&](auto element) {
    using scalar_t = decltype(element);
    hash_kernel<scalar_t>(x.data_ptr<scalar_t>(), tokens, chunks, tau, static_cast<float>(temperature), l1,
                          codes.data_ptr<int16_t>(), p.data_ptr<float>());
  });
  return {codes, p};
}

at::Tensor hash_backward(const at::Tensor& x, const at::Tensor& p, const at::Tensor& dp, int64_t tau,
                         double temperature, bool l1) {
  auto dx = at::empty_like(x);
  dispatch(x.scalar_type(), "hash_backward", [&](auto element) {
    using scalar_t = decltype(element);
    hash_backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), p.data_ptr<float>(), dp.data_ptr<float>(), x.size(0),
                                   x.size(1) / tau, tau, static_cast<float>(temperature), l1,
                                   dx.data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace megamem
