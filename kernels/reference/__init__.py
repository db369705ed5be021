"""Plain-torch reference implementations of every kernel op (backend "torch", priority 0).

They run on CPU and GPU, compute in float32 and return the input dtype. They are the ground
truth of the tests: simple and obviously right, not fast.
"""
from kernels.reference.activation import silu_and_mul
from kernels.reference.attention import (decode_attention, extend_attention,
                                         rope_decode_attention)
from kernels.reference.kv_cache import store_kv
from kernels.reference.linear import head_matmul, linear, linear_silu_and_mul, rms_norm_linear
from kernels.reference.logits import apply_penalties, apply_token_bitmask, count_tokens
from kernels.reference.mla import mla_absorb_rope, mla_decode, mla_extend, mla_prefill
from kernels.reference.moe import (fused_moe, fused_moe_mxfp4, moe_route, rms_norm_router_logits,
                                   router_logits)
from kernels.reference.norm import fused_add_rms_norm, rms_norm
from kernels.reference.rope import rope, rope_store_kv
from kernels.reference.sample import sample
from kernels.reference.spec_accept import spec_accept

__all__ = [
    "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope", "store_kv", "rope_store_kv",
    "decode_attention", "extend_attention", "mla_decode", "mla_extend", "mla_prefill",
    "router_logits", "moe_route", "fused_moe", "fused_moe_mxfp4", "sample",
    "apply_token_bitmask", "apply_penalties", "count_tokens", "spec_accept", "linear",
    "linear_silu_and_mul", "head_matmul", "mla_absorb_rope", "rms_norm_linear",
    "rms_norm_router_logits", "rope_decode_attention",
]
