"""Fast paths, and the choice among them: rotary rotation, RMSNorm, the LM head with its cross-entropy,
fused projections, Triton. The model and the encodings call the plain functions here and read like the math.

    rotary     rotate: rotary rotation in either pairing (torch; Triton on CUDA; the formula under compile)
    norm       rms_norm: RMSNorm, its backward through torch's fused layer-norm kernel
    loss       linear_cross_entropy: the LM head and its cross-entropy without full-size logits
    linear     split_linear: fused projections whose backward never concatenates its parts' gradients
    attention  attention_with_lse: SDPA with each query's log-sum-exp, for merging score sets
"""

from minillm.kernels.attention import attention_with_lse
from minillm.kernels.linear import split_linear
from minillm.kernels.loss import linear_cross_entropy
from minillm.kernels.norm import rms_norm
from minillm.kernels.rotary import (
           TRITON_AVAILABLE,
           rotate,
           rotate_half_fused,
           rotate_pairs,
           rotate_triton,
           triton_applies,
)

__all__ = ["TRITON_AVAILABLE", "attention_with_lse", "linear_cross_entropy", "rms_norm", "rotate", "rotate_half_fused",
           "rotate_pairs", "rotate_triton", "split_linear", "triton_applies"]
