"""The train stage's changes to unsloth's runtime (stages/unsloth_runtime.py), against stand-ins that
behave like unsloth_zoo 2026.10's offload helpers: unsloth cannot be imported without a GPU."""

import logging

import torch

from conftest import offload_helpers
from stages import unsloth_runtime

def test_pinned_slots_take_their_whole_block_and_grow_only_past_it():
    module, asked = offload_helpers()
    assert unsloth_runtime.offload_slots_in_whole_pinned_blocks(module)
    slot = module._new_host_buffer(300_000, torch.bfloat16)  # 600,000 bytes: torch pins a 1 MiB block
    assert slot.numel() == 524_288  # unsloth grows a slot only past its numel: up to 1 MiB, no resize_
    slot = module._grow_host_buffer(slot, 600_000)  # 1.2 MB: the next block, 2 MiB
    module._new_host_buffer(4_096, torch.float32)  # exactly a block already
    assert asked == [("new", 524_288), ("grow", 1_048_576), ("new", 4_096)]
    assert slot.numel() == 1_048_576


def test_pageable_slots_are_sized_as_unsloth_sizes_them():
    # Whole blocks cost nothing only where torch's pinned allocator rounds up anyway.
    module, asked = offload_helpers(pinned=False)
    unsloth_runtime.offload_slots_in_whole_pinned_blocks(module)
    slot = module._new_host_buffer(300_000, torch.bfloat16)  # pinning on: asked whole, refused (over budget)
    slot = module._grow_host_buffer(slot, 600_000)  # pageable: made anew, exactly as large as unsloth asks
    assert slot.numel() == 600_000
    module._grow_host_buffer(slot, 700_000)  # and again
    module._pinned_memory_disabled = lambda: True  # UNSLOTH_DISABLE_PINNED_MEMORY=1
    module._new_host_buffer(300_000, torch.bfloat16)
    module._pinned_memory_disabled, module.PINNED_MEMORY_AVAILABLE = (lambda: False), False  # pinning failed once
    module._new_host_buffer(300_000, torch.bfloat16)
    assert asked == [("new", 524_288), ("grow", 600_000), ("new", 600_000), ("grow", 700_000), ("new", 700_000),
                     ("new", 300_000), ("new", 300_000)]


def test_applied_twice_it_wraps_once():
    # load_for_training may run more than once in one process (as in this test suite).
    module, asked = offload_helpers()
    unsloth_runtime.offload_slots_in_whole_pinned_blocks(module)
    wrapped = module._grow_host_buffer
    assert unsloth_runtime.offload_slots_in_whole_pinned_blocks(module)
    assert module._grow_host_buffer is wrapped


def test_an_unsloth_zoo_without_the_helpers_trains_as_shipped_and_says_so(caplog):
    module, asked = offload_helpers()
    del module._pinned_block_bytes
    shipped = module._new_host_buffer
    with caplog.at_level(logging.INFO, logger="stages.unsloth_runtime"):
        assert not unsloth_runtime.offload_slots_in_whole_pinned_blocks(module)
    assert module._new_host_buffer is shipped
    assert "sized as unsloth_zoo sizes them" in caplog.text
