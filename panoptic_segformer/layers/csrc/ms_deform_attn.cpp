// Operator schemas of the multi-scale deformable attention op, and the pybind module
// `panoptic_segformer._C`.  Kernels are registered per device in cpu/ and cuda/.
//
// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2) in [0, 1], x then y; attention_weights (N, Lq, M, L, P);
// output (N, Lq, M*D).  Sampling = F.grid_sample(bilinear, zeros, align_corners=False).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ms_deform_attn_cpu.h"

TORCH_LIBRARY(panoptic_segformer, m) {
  // The fake (meta) kernels and the autograd formula are registered from Python.
  m.set_python_module("panoptic_segformer.layers.ms_deform_attn");
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {
bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

#define PSF_STRINGIFY_(...) #__VA_ARGS__  // variadic: the list has commas
#define PSF_STRINGIFY(...) PSF_STRINGIFY_(__VA_ARGS__)
std::string cuda_archs() {
#if defined(WITH_CUDA) && defined(PSF_CUDA_ARCHS)
  return PSF_STRINGIFY(PSF_CUDA_ARCHS);
#else
  return "";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "panoptic_segformer compiled ops (multi-scale deformable attention)";
  m.def("cuda_compiled", &cuda_compiled, "True when the extension was built with the CUDA kernels");
  m.def("cuda_archs", &cuda_archs, "GPU targets of the CUDA kernels, e.g. 'sm_80,sm_90,compute_90' ('' without them)");
  m.def("cpu_kernel_isa", &panoptic_segformer::cpu::kernel_isa,
        "CPU kernel variant in use: 'avx512', 'avx2' or 'baseline'");
  m.def("set_cpu_kernel_isa", &panoptic_segformer::cpu::set_kernel_isa,
        "'baseline', 'avx2' or 'avx512' forces that CPU kernel variant (error if unsupported here), "
        "'auto' picks the widest supported (for tests and benchmarks)");
}
