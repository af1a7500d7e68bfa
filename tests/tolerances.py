"""Every numeric tolerance the test-suite uses, in one place.

Each constant says what it bounds and why that bound is right.
"""

# fp32 outputs of two computations that are mathematically equal but ordered differently
# (e.g. a merged weight vs. base + LoRA path).
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5

# Weights after merge followed by unmerge, in fp32.
MERGE_ROUNDTRIP_ATOL = 1e-6

# bf16 has an 8-bit mantissa: a relative error of 2^-8 per rounding.
BF16_ATOL = 2e-2
BF16_RTOL = 2e-2

# Distributed runs vs. the single-process reference (fp32, reductions reordered).
DIST_ATOL = 1e-5
# ... and relative: same order of error as FP32_RTOL (2 ranks reorder sums of a few terms).
DIST_RTOL = 1e-5

# svdquant: truncated-SVD residual may exceed the Eckart-Young optimum by this factor.
SVD_OPTIMALITY_RATIO = 1.01

# Fast LoRA paths (fused addmm, batched per-sample routing) vs the simple reference path, fp32:
# the same products summed in another order (concatenated ranks, bmm vs mm), so only rounding of
# a few ulps of the largest partial sums differs.
FASTPATH_ATOL = 1e-5
FASTPATH_RTOL = 1e-5

# `torchrun --nproc-per-node 2 -m qpeft recover` vs one process: only the reduction order differs
# (per-rank partial sums of the losses, gradients and metrics). Metrics compare relatively above 1
# and absolutely below (a KL of 1e-4 carries float32 rounding of the logits).
DIST_RECOVER_ADAPTER_RTOL = 1e-3  # ||A_2 - A_1|| / ||A_1|| per adapter factor
DIST_RECOVER_METRIC_TOL = 1e-4

# vLLM's own kernels vs qpeft's fake-quantized layers on one probe input, relative to the largest
# |output| (tests/checkpoint/test_deploy_vllm.py; the weights themselves compare bit for bit).
# vLLM serves in bf16 (fp32 models are downcast): one bf16 rounding of the output, 2^-8. Its FP8
# GEMM quantizes the input and accumulates in fp32 where fake quant works in the model's dtype,
# and its NVFP4 emulation computes an activation block scale as global * (amax / 6), not
# (amax / 6) / global, so one can round to the neighbouring e4m3 value (seen: 1.6%).
ENGINE_OUTPUT_RTOL = 3e-2
