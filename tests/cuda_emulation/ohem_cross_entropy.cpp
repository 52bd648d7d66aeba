// The CUDA OHEM cross-entropy ops (csrc/cuda/ohem_cross_entropy_host.h and _kernels.cuh, the
// code ohem_cross_entropy.cu launches) with their blocks run on CPU threads by shim.h; and
// the backward's tiling, for tests of its choices.
#include <torch/csrc/utils/pybind.h>  // pybind11 and its at::Tensor caster: half the build time of torch/extension.h

#include "cuda_emulation/launcher.h"
#include "cuda/ohem_cross_entropy_host.h"

namespace {

using namespace bisenet_fast::ohem_cuda;

using cuda_emulation::EmulatedLauncher;

// A GPU with sm_count SMs whose blocks may opt in to shared_bytes_optin of shared memory.
DeviceCaps caps(int64_t sm_count, int64_t shared_bytes_optin) {
  return {static_cast<int>(sm_count), static_cast<size_t>(shared_bytes_optin)};
}

std::tuple<at::Tensor, at::Tensor> emulated_forward(const at::Tensor& logits, const at::Tensor& target,
                                                    c10::optional<double> thresh, int64_t min_kept,
                                                    int64_t ignore_index, bool check_labels) {
  return bisenet_fast::ohem_cuda::forward<EmulatedLauncher>(logits, target, thresh, min_kept, ignore_index,
                                                            check_labels);
}

at::Tensor emulated_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& threshold, int64_t ignore_index, int64_t sm_count,
                             int64_t shared_bytes_optin) {
  return bisenet_fast::ohem_cuda::backward<EmulatedLauncher>(grad_loss, logits, target, threshold, ignore_index,
                                                             caps(sm_count, shared_bytes_optin));
}

pybind11::dict tiling(const at::Tensor& logits, const at::Tensor& target, int64_t sm_count,
                      int64_t shared_bytes_optin) {
  const BackwardTiling t = backward_tiling(geometry(logits, target), caps(sm_count, shared_bytes_optin));
  pybind11::dict d;
  d["band_rows"] = t.band_rows;
  d["tile_cols"] = t.tile_cols;
  d["x_chunk"] = t.x_chunk;
  d["shared_bytes"] = t.shared_bytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emulated_forward, "ohem_cross_entropy_forward: (loss, threshold)");
  m.def("backward", &emulated_backward, "ohem_cross_entropy_backward: the logits' gradient");
  m.def("tiling", &tiling, "The backward's blocks (bisenet_fast::ohem_cuda::backward_tiling).");
}
