"""Write small GGUF checkpoints for tests, the way llama.cpp's converter lays them out: HF
tensor names renamed to GGUF's, Llama q/k rows permuted for the interleaved rope, 2-D
weights quantized with `gguf.quants` (norms and biases stay F32), shape and tokenizer in
the `<arch>.*` / `tokenizer.ggml.*` metadata. Written here from the GGUF format, not with
the code under test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

Q = GGMLQuantizationType
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """HF name -> GGUF name; names of neither scheme (rope_freqs.weight) pass through."""
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    if not hf_name.startswith("model.layers."):
        return hf_name
    _, _, layer, rest = hf_name.split(".", 3)          # model.layers.<i>.<module>.<suffix>
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{_LAYER[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rope pairs of each head interleaved."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A float32 array in `qtype` (the bytes a GGUF stores)."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    return quantize(array.astype(np.float32), qtype)


def write_gguf(path: Path, arch: str, hf_config: dict, state_dict: dict[str, torch.Tensor],
               weight_type: GGMLQuantizationType = Q.F32,
               raw: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
               tokenizer: dict | None = None, extra: dict | None = None) -> Path:
    """`state_dict`: HF names -> tensors; `raw`: HF names -> (stored bytes, type) written
    as they are instead (for types gguf cannot quantize); `tokenizer`: {tokens, merges,
    bos, eos, chat_template}; `extra`: more key -> value metadata (strings, ints, floats)."""
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads", heads))
    head_dim = int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(int(hf_config["num_hidden_layers"]))
    w.add_context_length(int(hf_config["max_position_embeddings"]))
    w.add_embedding_length(int(hf_config["hidden_size"]))
    w.add_feed_forward_length(int(hf_config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(hf_config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(hf_config["rms_norm_eps"]))
    w.add_vocab_size(int(hf_config["vocab_size"]))
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer.get("types") or [1] * len(tokenizer["tokens"]))
        w.add_token_merges(tokenizer["merges"])
        w.add_bos_token_id(tokenizer["bos"])
        w.add_eos_token_id(tokenizer["eos"])
        w.add_add_bos_token(False)
        w.add_chat_template(tokenizer["chat_template"])
    for name, tensor in state_dict.items():
        if raw and name in raw:
            data, qtype = raw[name]
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            continue
        array = tensor.detach().float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            array = llama_cpp_permute(array, heads if ".q_proj." in name else kv_heads)
        qtype = weight_type if array.ndim == 2 else Q.F32
        w.add_tensor(gguf_name(name), encode(array, qtype),
                     raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
