// Schemas of the compiled kernels; each op's CPU and CUDA files register their implementations.
//
// vdvae_fast/ops.py is the public API: it validates inputs, draws seeds and wraps these
// kernels in torch.library custom ops with autograd. Kernels here assume validated inputs.
#include <torch/extension.h>

TORCH_LIBRARY(vdvae_fast_C, m) {
  // dmol: scale indexes reference.SCALES (0 exp, 1 softplus), beta is softplus' sharpness, log_scale_min the floor
  m.def(
      "dmol_nll_forward(Tensor logits, Tensor x, int num_bits, int scale, float beta, float log_scale_min) -> Tensor");
  m.def(
      "dmol_nll_backward(Tensor grad_nll, Tensor logits, Tensor x, int num_bits, int scale, float beta, "
      "float log_scale_min) -> Tensor");
  m.def("dmol_sample(Tensor logits, int scale, float beta, float log_scale_min, int seed) -> Tensor");
  // The Gaussian ops' parametrization: scale, posterior and kl_estimator index reference.SCALES, POSTERIORS and
  // KL_ESTIMATORS; beta is the softplus sharpness (gaussian_math.h).
  m.def(
      "sample_and_kl_forward(Tensor mu_q, Tensor logsigma_q, Tensor mu_p, Tensor logsigma_p, "
      "int seed, int scale, float beta, int posterior, int kl_estimator) -> (Tensor, Tensor)");
  m.def(
      "sample_and_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu_q, Tensor logsigma_q, "
      "Tensor mu_p, Tensor logsigma_p, int seed, int scale, float beta, int posterior, "
      "int kl_estimator) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gaussian_kl_forward(Tensor mu_q, Tensor logsigma_q, Tensor mu_p, Tensor logsigma_p, "
      "int scale, float beta, int posterior) -> Tensor");
  m.def(
      "gaussian_kl_backward(Tensor grad_kl, Tensor mu_q, Tensor logsigma_q, Tensor mu_p, "
      "Tensor logsigma_p, int scale, float beta, int posterior) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sample_gaussian_forward(Tensor mu, Tensor logsigma, float temperature, int seed, int scale, "
      "float beta) -> Tensor");
  m.def(
      "sample_gaussian_backward(Tensor grad_z, Tensor mu, Tensor logsigma, float temperature, "
      "int seed, int scale, float beta) -> Tensor");
  // The CUDA kernels' per-pixel bodies run on the host, for tests (cuda_bodies_on_host.cpp)
  m.def(
      "dmol_nll_forward_cuda_body_on_host(Tensor logits, Tensor x, int num_bits, int scale, float beta, "
      "float log_scale_min) -> Tensor");
  m.def(
      "dmol_nll_backward_cuda_body_on_host(Tensor grad_nll, Tensor logits, Tensor x, int num_bits, int scale, "
      "float beta, float log_scale_min) -> Tensor");
  m.def(
      "dmol_sample_forward_cuda_body_on_host(Tensor logits, int scale, float beta, float log_scale_min, int seed) "
      "-> Tensor");
  m.def(
      "sample_and_kl_forward_cuda_body_on_host(Tensor mu_q, Tensor logsigma_q, Tensor mu_p, Tensor logsigma_p, "
      "int seed, int scale, float beta, int posterior, int kl_estimator, int vec) -> (Tensor, Tensor)");
  m.def(
      "sample_and_kl_backward_cuda_body_on_host(Tensor grad_z, Tensor grad_kl, Tensor mu_q, Tensor logsigma_q, "
      "Tensor mu_p, Tensor logsigma_p, int seed, int scale, float beta, int posterior, int kl_estimator, "
      "int vec) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gaussian_kl_forward_cuda_body_on_host(Tensor mu_q, Tensor logsigma_q, Tensor mu_p, Tensor logsigma_p, "
      "int scale, float beta, int posterior, int vec) -> Tensor");
  m.def(
      "gaussian_kl_backward_cuda_body_on_host(Tensor grad_kl, Tensor mu_q, Tensor logsigma_q, Tensor mu_p, "
      "Tensor logsigma_p, int scale, float beta, int posterior, int vec) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sample_gaussian_forward_cuda_body_on_host(Tensor mu, Tensor logsigma, float temperature, int seed, "
      "int scale, float beta, int vec) -> Tensor");
  m.def(
      "sample_gaussian_backward_cuda_body_on_host(Tensor grad_z, Tensor mu, Tensor logsigma, float temperature, "
      "int seed, int scale, float beta, int vec) -> Tensor");
}

static bool built_with_cuda() {
#ifdef VDVAE_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vdvae_fast compiled kernels (ops are registered under torch.ops.vdvae_fast_C)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
}
