// Python bindings of the CPU Memory Layer: argument checks, then the kernels of hash.cpp and gather_sum.cpp.
#include "memory_layer.h"

#include <torch/csrc/utils/pybind.h>      // pybind11 with torch types, without all of <torch/extension.h>

namespace {

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
}

void check_codes(const at::Tensor& codes, const at::Tensor& p, int64_t chunks) {
  check(codes, "codes", 2);
  check(p, "p", 2);
  TORCH_CHECK(codes.scalar_type() == at::kShort && p.scalar_type() == at::kFloat, "codes must be int16 and p float32");
  TORCH_CHECK(codes.size(1) == chunks && p.sizes() == codes.sizes(),
              "codes and p must be [N, K] with K = tables.size(0) = ", chunks, ", got ", codes.sizes(), " and ",
              p.sizes());
}

std::vector<at::Tensor> hash(const at::Tensor& x, int64_t tau, double temperature, bool l1) {
  check(x, "x", 2);
  TORCH_CHECK(tau >= 1 && tau <= 15, "tau must be between 1 and 15 for int16 codes, got ", tau);
  TORCH_CHECK(x.size(1) % tau == 0, "input width ", x.size(1), " is not a multiple of tau=", tau);
  return megamem::hash(x, tau, temperature, l1);
}

at::Tensor hash_backward(const at::Tensor& x, const at::Tensor& p, const at::Tensor& dp, int64_t tau,
                         double temperature, bool l1) {
  check(x, "x", 2);
  check(p, "p", 2);
  check(dp, "dp", 2);
  TORCH_CHECK(p.scalar_type() == at::kFloat && dp.scalar_type() == at::kFloat, "p and dp must be float32");
  TORCH_CHECK(x.size(1) == p.size(1) * tau && p.sizes() == dp.sizes() && p.size(0) == x.size(0),
              "x must be [N, K*tau] and p, dp [N, K]");
  return megamem::hash_backward(x, p, dp, tau, temperature, l1);
}

at::Tensor pack_tables(const at::Tensor& tables) {
  check(tables, "tables", 3);
  return megamem::pack_tables(tables);
}

at::Tensor gather_sum(const at::Tensor& codes, const at::Tensor& p, const at::Tensor& tables,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed) {
  check(tables, "tables", 3);
  check_codes(codes, p, tables.size(0));
  if (bias) {
    check(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == tables.size(2) && bias->scalar_type() == tables.scalar_type(),
                "bias must be [D] in the tables' dtype");
  }
  if (packed) {
    check(*packed, "packed tables", 4);
    TORCH_CHECK(packed->scalar_type() == at::kFloat && packed->size(1) == tables.size(0) &&
                packed->size(2) == tables.size(1) && packed->size(0) * packed->size(3) >= tables.size(2),
                "packed tables must come from pack_tables(tables)");
  }
  return megamem::gather_sum(codes, p, tables, bias, packed);
}

std::vector<at::Tensor> gather_sum_backward(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& p,
                                            const at::Tensor& tables) {
  check(tables, "tables", 3);
  check(dy, "dy", 2);
  check_codes(codes, p, tables.size(0));
  TORCH_CHECK(dy.scalar_type() == tables.scalar_type(), "dy and tables must share a dtype");
  TORCH_CHECK(dy.size(0) == codes.size(0) && dy.size(1) == tables.size(2), "dy must be [N, D]");
  return megamem::gather_sum_backward(dy, codes, p, tables);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hash", &hash, "codes and p of every chunk");
  m.def("hash_backward", &hash_backward, "gradient of the input from the gradient of p");
  m.def("reads_in_place", &megamem::reads_in_place, "whether gather_sum of this many tokens reads rows in place");
  m.def("pack_tables", &pack_tables, "the tables in the layout gather_sum reads, to pass it again and again");
  m.def("gather_sum", &gather_sum, "weighted sum of retrieved rows", py::arg("codes"), py::arg("p"), py::arg("tables"),
        py::arg("bias"), py::arg("packed") = py::none());
  m.def("gather_sum_backward", &gather_sum_backward, "table gradients and the gradient of p");
}
