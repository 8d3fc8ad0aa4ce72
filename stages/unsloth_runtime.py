"""What the train stage changes in unsloth's runtime for speed, each change measured.

Called by stages.modeling once unsloth is imported and before the model is loaded. Each change
only removes a stall: the training is the same up to bf16 rounding. The measurements, the
devices they ran on and the commits that hold them are in benchmarks/README.md ("History").
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# unsloth_zoo's helpers behind its offloaded gradient checkpointing (unsloth_zoo 2026.10.x), and
# HOST_PINNED_ATTR, the attribute it marks a pinned slot with
SLOT_HELPERS = ("_new_host_buffer", "_grow_host_buffer", "_pinned_block_bytes")


def before_training() -> None:
    """Every change below, once unsloth is imported."""
    train_attention_without_cudnn()
    offload_slots_in_whole_pinned_blocks()


def train_attention_without_cudnn() -> None:
    """Training attention never on cuDNN.

    On H100 / H200 torch's scaled_dot_product_attention picks cuDNN for training, and cuDNN
    builds a plan for every new sequence length (unsloth pads each row to a multiple of 128 to
    bound them): ~170 ms the first time a batch holds a row of a new length, in every process
    separately, and DDP waits for the slowest. Measured with unsloth on 2 x H200, warmed, in
    A-B-B-A order (benchmarks/README.md, "History": 7c168f5): one GPU 2.7% faster in steady
    tokens/s and 13% over a 24-step session, two GPUs 7.3% and 18%; +0.12 GiB reserved on one GPU.
    torch prefers cuDNN for training on data-center Hopper and Blackwell GPUs only; elsewhere it
    already picks flash or memory-efficient attention, which this leaves as it is.
    """
    import torch

    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("attention: cuDNN off (on H100/H200 it builds a plan per new sequence length)")


def offload_slots_in_whole_pinned_blocks(module=None) -> bool:
    """unsloth's offloaded activations kept in host slots as large as their pinned block.

    unsloth offloads each layer's input to a pinned host slot sized to the largest input so far.
    When a process meets more tokens than at any step before, every layer's slot grows by a
    resize_ that takes a new block and copies the old contents (which are rewritten before they
    are read): 5-16 ms a layer on average on an H100 host, 0.17-0.49 s a step for the 8B model, and
    DDP waits for the slowest process. torch's caching host allocator rounds every pinned block up
    to a power of two (with its default settings), so asking for the whole block costs no extra
    pinned memory, and a slot then grows only past a power of two. Measured with unsloth on
    2 x H100, warmed, in both orders (benchmarks/README.md, "History": 8dbd65e): no slot grew
    after the first step (unsloth's sizing grew them at 4 of 24 steps on two GPUs, 2 on one), two
    GPUs 4.3% faster in steady tokens/s, one GPU 0.5%, the same GPU memory; two GPUs against one
    went from 1.80x to 1.87x in that comparison (1.86x for the stage over 40 steps).

    Pageable slots are sized as unsloth sizes them: with pinned memory off, and when unsloth
    regrows a slot that is pageable. A slot that unsloth's pinned budget per process refuses while
    it is being made or grown is pageable at the whole block's size (up to twice its bytes).
    Returns whether the helpers were found: they are private to unsloth_zoo, so a version without
    them trains as unsloth ships it, and the log says so.
    """
    if module is None:
        from unsloth_zoo import gradient_checkpointing as module
    found = all(callable(getattr(module, name, None)) for name in SLOT_HELPERS) and hasattr(module, "HOST_PINNED_ATTR")
    if not found:
        log.info("offload slots: sized as unsloth_zoo sizes them (this version lacks %s or HOST_PINNED_ATTR)",
                 ", ".join(SLOT_HELPERS))
        return False
    if getattr(module._grow_host_buffer, "whole_pinned_blocks", False):
        return True
    new, grow, block_bytes = module._new_host_buffer, module._grow_host_buffer, module._pinned_block_bytes

    def pinning() -> bool:
        disabled = getattr(module, "_pinned_memory_disabled", lambda: False)
        return bool(getattr(module, "PINNED_MEMORY_AVAILABLE", True)) and not disabled()

    def whole(numel: int, dtype) -> int:
        return max(numel, block_bytes(numel * dtype.itemsize) // dtype.itemsize)

    regrowing_pageable = []  # unsloth regrows a pageable slot by making a new one: at its exact size

    def new_host_buffer(numel, dtype):
        return new(whole(numel, dtype) if pinning() and not regrowing_pageable else numel, dtype)

    def grow_host_buffer(buffer, new_size):
        if getattr(buffer, module.HOST_PINNED_ATTR, False):  # unsloth's own record of it
            return grow(buffer, whole(new_size, buffer.dtype))
        regrowing_pageable.append(buffer)
        try:
            return grow(buffer, new_size)
        finally:
            regrowing_pageable.pop()

    grow_host_buffer.whole_pinned_blocks = True
    module._new_host_buffer, module._grow_host_buffer = new_host_buffer, grow_host_buffer
    log.info("offload slots: pinned ones in whole blocks (a slot grows only past a power of two, not at every new high)")
    return True
