"""How much evaluation work fits at once: `eval.batch_size: auto` from the GPU memory left free.

The model's weights are already loaded when these run; what remains is shared between the KV
cache of the answers being written (stages/decoding.py) and the activations of one forward pass.
Estimates come from the model's config alone, and leave a reserve for the CUDA graph, cuBLAS
workspaces and allocator fragmentation, so a 24 GB card holding the 8B model in bf16 (~15 GiB)
stays near 20 GiB (measured: benchmarks/README.md).
"""

from __future__ import annotations

GIB = 2**30
RESERVE = 3 * GIB  # never planned for: CUDA context growth, graph pool, cuBLAS workspaces, fragmentation
CPU_BATCH = 16  # without a GPU memory is not the limit, and larger batches are not faster
MAX_ANSWERS = 128  # beyond this a decoding step reads more KV cache than weights: little gained
PREFILL_TOKENS = 8192  # prompt tokens (padding included) per prefill pass, at most
LOGIT_CHUNK = 1024  # scored positions per pass through the output layer (~1.3 GB for a 128k vocabulary)


def free_bytes() -> int:
    """GPU memory this process can still take: free on the device plus PyTorch's unused cache."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _dims(config) -> tuple[int, int, int]:
    return head_dim(config), config.num_attention_heads, config.num_key_value_heads


def _itemsize(model) -> int:
    return model.get_input_embeddings().weight.dtype.itemsize


def kv_bytes_per_token(config, itemsize: int) -> int:
    """Keys and values of one token, all layers."""
    head_dim, _, kv_heads = _dims(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def forward_bytes_per_token(config, itemsize: int) -> int:
    """Activations of one token in a forward pass without a cache, at its widest (one layer at a
    time): residual and normed hidden states, q/k/v and the attention output with its key/value
    heads repeated (sdpa with a padding mask), and the MLP's gate, up and product. (The output
    layer runs over LOGIT_CHUNK positions at a time: logit_bytes.)"""
    head_dim, heads, _ = _dims(config)
    return itemsize * (4 * config.hidden_size + 6 * heads * head_dim + 3 * config.intermediate_size)


def logit_bytes(config) -> int:
    """The output layer over one chunk of scored positions: bf16 and float32 logits and
    cross-entropy's log-softmax."""
    return LOGIT_CHUNK * config.vocab_size * (2 + 4 + 4)


def _on_gpu(model) -> bool:
    return model.device.type == "cuda"


def scoring_rows(model, longest: int, requested) -> int:
    """Rows per forward pass when scoring answers (loss, decisions)."""
    if requested != "auto":
        return requested
    if not _on_gpu(model):
        return CPU_BATCH
    itemsize = _itemsize(model)
    budget = free_bytes() - RESERVE - logit_bytes(model.config)
    return max(1, min(64, budget // (longest * forward_bytes_per_token(model.config, itemsize))))


def answer_plan(model, prompts: int, longest: int, max_len: int, requested) -> tuple[int, int]:
    """(answers written at once, prompt tokens per prefill pass). Each answer holds `max_len`
    tokens of KV cache; a prefill pass needs its activations and its own cache besides, and gets
    at most a quarter of the budget (never less than the longest prompt)."""
    if not _on_gpu(model):
        return max(1, min(CPU_BATCH if requested == "auto" else requested, prompts)), PREFILL_TOKENS
    config, itemsize = model.config, _itemsize(model)
    per_token = kv_bytes_per_token(config, itemsize)
    per_prefill_token = 2 * per_token + forward_bytes_per_token(config, itemsize)
    budget = free_bytes() - RESERVE
    prefill_tokens = max(longest, min(PREFILL_TOKENS, budget // 4 // per_prefill_token))
    if requested != "auto":
        return max(1, min(requested, prompts)), prefill_tokens
    per_answer = per_token * max_len + 8 * max_len + 8 * config.vocab_size
    slots = (budget - prefill_tokens * per_prefill_token) // per_answer
    return max(1, min(MAX_ANSWERS, prompts, slots)), prefill_tokens


def generate_rows(model, prompts: int, longest: int, max_len: int, requested) -> int:
    """Rows per transformers `generate` call (the fallback): each row prefills its whole prompt
    at once and grows a dynamic cache that is copied as it grows (measured: 0.35 GiB a row of
    ~1.9k tokens for the 8B model, against 0.25 GiB a slot of the fast loop)."""
    if requested != "auto" or not _on_gpu(model):
        return answer_plan(model, prompts, longest, max_len, requested)[0]
    config, itemsize = model.config, _itemsize(model)
    per_row = 3 * kv_bytes_per_token(config, itemsize) * max_len + \
        longest * forward_bytes_per_token(config, itemsize) + 12 * config.vocab_size  # last position's logits
    return max(1, min(MAX_ANSWERS, prompts, (free_bytes() - RESERVE) // per_row))
