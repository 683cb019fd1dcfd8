// Eight-float vectors for the CPU Memory Layer, written with GCC/Clang vector extensions so that one source
// compiles to AVX2 (or AVX-512, NEON, SSE: two halves) for whatever -march the machine gives, with no intrinsics.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace megamem {

constexpr int kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* src) {
  Vec v;
  std::memcpy(&v, src, sizeof(Vec));
  return v;
}

inline void store(float* dst, Vec v) { std::memcpy(dst, &v, sizeof(Vec)); }

inline Vec splat(float value) { return Vec{} + value; }

// Lane j is base[index[j]]: eight scattered floats (a column of a row-major block, say) as one vector.
inline Vec gather(const float* base, IntVec index) {
  return Vec{base[index[0]], base[index[1]], base[index[2]], base[index[3]],
             base[index[4]], base[index[5]], base[index[6]], base[index[7]]};
}

inline Vec abs(Vec v) {
  IntVec bits;
  std::memcpy(&bits, &v, sizeof(Vec));
  bits &= 0x7fffffff;
  std::memcpy(&v, &bits, sizeof(Vec));
  return v;
}

// Lanes of a and b (a's are 0-7, b's 8-15) in the order given.
template <int... lanes>
inline Vec shuffle(Vec a, Vec b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, lanes...);
#else
  return __builtin_shuffle(a, b, IntVec{lanes...});
#endif
}

template <int... lanes>
inline Vec permute(Vec v) { return shuffle<lanes...>(v, v); }

// Lane j of the result is op over the lanes of v[j], for eight vectors at once: three levels of pairwise
// shuffles (15 in all) instead of eight separate lane trees and their scalar extractions.
template <typename Op>
inline Vec reduce_eight(const Vec* v, Op op) {
  Vec half[4], quarter[2];
  for (int i = 0; i < 4; ++i) {
    half[i] = op(shuffle<0, 1, 2, 3, 8, 9, 10, 11>(v[2 * i], v[2 * i + 1]),
                 shuffle<4, 5, 6, 7, 12, 13, 14, 15>(v[2 * i], v[2 * i + 1]));      // v[2i] in 0-3, v[2i+1] in 4-7
  }
  for (int i = 0; i < 2; ++i) {
    quarter[i] = op(shuffle<0, 1, 8, 9, 4, 5, 12, 13>(half[2 * i], half[2 * i + 1]),
                    shuffle<2, 3, 10, 11, 6, 7, 14, 15>(half[2 * i], half[2 * i + 1]));  // v[4i], v[4i+2], v[4i+1], v[4i+3]
  }
  const Vec whole = op(shuffle<0, 8, 2, 10, 4, 12, 6, 14>(quarter[0], quarter[1]),
                       shuffle<1, 9, 3, 11, 5, 13, 7, 15>(quarter[0], quarter[1]));   // v[0], v[4], v[2], v[6], v[1], ...
  return permute<0, 4, 2, 6, 1, 5, 3, 7>(whole);
}

// Sum of the lanes as a tree of three shuffles and adds (a chain of seven scalar adds is twice as long).
inline float sum(Vec v) {
  v += permute<4, 5, 6, 7, 0, 1, 2, 3>(v);
  v += permute<2, 3, 0, 1, 6, 7, 4, 5>(v);
  v += permute<1, 0, 3, 2, 5, 4, 7, 6>(v);
  return v[0];
}

// exp(-y) for y >= 0, to about 2 ulp: exp(-y) = 2^n e^r with |r| <= ln2/2 and a degree-6 polynomial for e^r
// (Cephes' expf coefficients). Inputs past 87 return exp(-87) ~ 1.6e-38: 1 + that is 1 in float anyway.
inline Vec exp_negative(Vec y) {
  Vec x = -y;
  x = x < -87.0f ? splat(-87.0f) : x;
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round to nearest via 1.5 * 2^23
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;              // x - n ln2 in two parts
  Vec poly = splat(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const Vec er = poly * (r * r) + r + 1.0f;
  IntVec exponent = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof(Vec));
  return er * scale;
}

// Element conversions at the edges of a kernel: everything inside runs in float.
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

template <typename T>
inline void load_floats(const T* src, int64_t count, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, count * sizeof(float));
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]);
  }
}

template <typename T>
inline void store_floats(const float* src, int64_t count, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, count * sizeof(float));
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = from_float<T>(src[i]);
  }
}

// Writes `vecs` vectors to dst past the caches (non-temporal stores), for output written once and not read
// again soon: the cache lines are not read first. Returns false, writing nothing, where the machine has no such
// store, dst is not vector-aligned or not float. stream_fence() orders them before the thread's later stores.
template <typename T>
inline bool stream_floats(const Vec* src, int vecs, T* dst) {
#if defined(__AVX__)
  if (!std::is_same_v<T, float> || reinterpret_cast<uintptr_t>(dst) % sizeof(Vec)) return false;
  for (int v = 0; v < vecs; ++v) _mm256_stream_ps(reinterpret_cast<float*>(dst) + v * kLanes, reinterpret_cast<__m256>(src[v]));
  return true;
#else
  return false;
#endif
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace megamem
