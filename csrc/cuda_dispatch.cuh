// The dtypes the CUDA kernels are built for: float32, float16 and bfloat16. The ops run float64 (gradcheck)
// on the cpu and reference backends only, so no float64 kernel is compiled for the GPU; a float64 tensor
// reaching a CUDA kernel gets ATen's "not implemented for 'Double'" error.
#pragma once

#include <ATen/Dispatch.h>

#define VF_DISPATCH_CUDA_FLOAT_TYPES(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
