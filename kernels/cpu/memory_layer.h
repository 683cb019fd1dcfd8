// The CPU Memory Layer's operations (docs/model.md, "The Memory Layer"), on checked, contiguous CPU tensors.
//
// Shapes: N tokens, K chunks (tables), T = tau bits, R = 2^tau rows, D = d_out.
//   hash(x [N, K*T]) -> codes [N, K] int16, p [N, K] float32
//   hash_backward(x, p, dp [N, K] float32) -> dx [N, K*T]
//   gather_sum(codes, p, tables [K, R, D], bias [D] or none, packed or none) -> y [N, D]
//   gather_sum_backward(dy [N, D], codes, p, tables) -> dtables [K, R, D], dp [N, K] float32
// Inputs, tables and outputs are float32, bfloat16 or float16; everything inside is computed in float32.
#pragma once

// The few ATen headers the kernels use, not <ATen/ATen.h>: the extension compiles in half the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <vector>

namespace megamem {

std::vector<at::Tensor> hash(const at::Tensor& x, int64_t tau, double temperature, bool l1);
at::Tensor hash_backward(const at::Tensor& x, const at::Tensor& p, const at::Tensor& dp, int64_t tau,
                         double temperature, bool l1);
//   reads_in_place(N, R): whether gather_sum reads rows where they are (few tokens) rather than from packed tables
//   pack_tables(tables) -> the layout gather_sum reads, to hand it as `packed` while the tables are unchanged
bool reads_in_place(int64_t tokens, int64_t rows);
at::Tensor pack_tables(const at::Tensor& tables);
at::Tensor gather_sum(const at::Tensor& codes, const at::Tensor& p, const at::Tensor& tables,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed);
std::vector<at::Tensor> gather_sum_backward(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& p,
                                            const at::Tensor& tables);

// Calls body(value of the element type) for the dtypes the kernels accept.
template <typename Body>
void dispatch(at::ScalarType type, const char* operation, Body body) {
  switch (type) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(c10::BFloat16{});
    case at::kHalf: return body(c10::Half{});
    default: TORCH_CHECK(false, "megamem CPU kernel ", operation, ": dtype ", type, " is not supported "
                         "(float32, bfloat16, float16); use model.kernel=reference for other dtypes");
  }
}

}  // namespace megamem
