"""The fast loop's slot bookkeeping (stages/slots.py) and prefill chunking, without a model.

Slots are driven by hand here: `start` stands for a prefill and `record` for a decoding step that
chose the given tokens, as stages/decoding.py calls them.
"""

import pytest

from stages.decoding import prefill_chunks
from stages.slots import Slots, until_stop


def _tensor(values):
    import torch

    return torch.tensor(values)


def _step(slots, *chosen):
    slots.record(_tensor(list(chosen)))


def test_until_stop_cuts_before_the_first_stop_token():
    assert until_stop([5, 6, 2, 7, 2], [2, 9]) == ([5, 6], True)
    assert until_stop([5, 9], [2, 9]) == ([5], True)
    assert until_stop([5, 6], [2, 9]) == ([5, 6], False)  # the cap came first
    assert until_stop([], [2]) == ([], False)


def test_refill_gives_free_slots_the_longest_waiting_prompts_with_their_caps():
    slots = Slots(2, 32, "cpu")
    prompts = [[1] * 3, [2] * 5, [3] * 4, [4] * 5]
    slots.begin(prompts, caps=[4, 5, 6, 7], stop_ids=[99])
    assert slots.busy() and slots.all_free()  # prompts wait, no slot answers yet
    # longest first; of equal lengths, input order (prompt 1 before prompt 3)
    assert slots.refill() == [(0, prompts[1]), (1, prompts[3])]
    assert slots.owner == [1, 3] and slots.limits.tolist() == [5, 7] and list(slots.waiting) == [2, 0]
    assert slots.refill() == []  # no slot is free
    assert slots.busy() and not slots.all_free()


def test_start_and_record_keep_each_slots_token_position_count_and_history():
    slots = Slots(3, 16, "cpu")
    slots.start(_tensor([2, 0]), first=_tensor([7, 8]), lengths=_tensor([5, 4]))
    assert slots.tokens.tolist() == [8, 0, 7] and slots.positions.tolist() == [4, 0, 5]
    assert slots.generated.tolist() == [1, 0, 1] and slots.history[:, 0].tolist() == [8, 0, 7]
    _step(slots, 9, 10, 11)
    assert slots.tokens.tolist() == [9, 10, 11]  # fed to the next step
    assert slots.positions.tolist() == [5, 1, 6] and slots.generated.tolist() == [2, 1, 2]
    assert slots.history[:, :2].tolist() == [[8, 9], [10, 0], [7, 11]]  # each at its own count


def test_a_free_slot_runs_on_at_the_last_column_of_its_row():
    # A free slot keeps stepping with the others (the CUDA graph runs all rows): its position and
    # its history column stay inside its row of max_len, however long the others write.
    slots = Slots(1, 6, "cpu")
    slots.start(_tensor([0]), first=_tensor([7]), lengths=_tensor([3]))
    positions = []
    for token in range(20, 30):
        _step(slots, token)
        positions.append(slots.positions.item())
    assert positions == [4, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    assert slots.generated.item() == 11  # counts on: only the clamped columns are written
    assert slots.history[0].tolist() == [7, 20, 21, 22, 23, 29]


def test_a_refilled_slot_ignores_the_stop_token_of_the_answer_before_it():
    slots = Slots(1, 16, "cpu")
    slots.begin([[1] * 4, [2] * 3], caps=[10, 10], stop_ids=[99])
    assert slots.refill() == [(0, [1] * 4)]
    slots.start(_tensor([0]), first=_tensor([5]), lengths=_tensor([4]))
    for token in (6, 7, 8, 99, 9):  # the answer ends at its 5th token; the slot wrote on until the look
        _step(slots, token)
    assert slots.finished().tolist() == [True]
    assert slots.collect() == [(0, [5, 6, 7, 8], True)] and slots.all_free()
    assert slots.refill() == [(0, [2] * 3)]
    slots.start(_tensor([0]), first=_tensor([3]), lengths=_tensor([3]))
    _step(slots, 4)
    _step(slots, 4)
    assert slots.history[0, :6].tolist() == [3, 4, 4, 8, 99, 9]  # the old answer's 99, past the 3 written
    assert slots.finished().tolist() == [False]
    assert slots.collect() == [] and slots.owner == [1]
    for token in (4, 4, 4, 99):
        _step(slots, token)
    assert slots.finished().tolist() == [True]
    assert slots.collect() == [(1, [3, 4, 4, 4, 4, 4], True)]
    assert not slots.busy()


def test_a_stale_stop_token_past_the_written_tokens_is_not_read():
    # The previous answer wrote a stop token at column 6; the new one has written 3 tokens.
    slots = Slots(1, 12, "cpu")
    slots.begin([[1] * 2], caps=[9], stop_ids=[99])
    slots.history[0] = _tensor([1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])
    slots.refill()
    slots.start(_tensor([0]), first=_tensor([30]), lengths=_tensor([2]))
    _step(slots, 31)
    _step(slots, 32)
    assert slots.finished().tolist() == [False]
    assert slots.collect() == [] and slots.owner == [0]


def test_an_answer_past_its_cap_is_cut_at_the_cap_and_marked_cut_off():
    slots = Slots(2, 20, "cpu")
    slots.begin([[1] * 5, [2] * 3], caps=[3, 8], stop_ids=[99])
    slots.refill()
    slots.start(_tensor([0, 1]), first=_tensor([10, 20]), lengths=_tensor([5, 3]))
    streamed = []
    for k in range(4):  # slot 0 passes its cap of 3 (steps run in groups between looks)
        _step(slots, 11 + k, 21 + k)
    assert slots.finished().tolist() == [True, False]
    ended = slots.collect(stream=lambda index, tokens: streamed.append((index, tokens)))
    assert ended == [(0, [10, 11, 12], False)]
    assert streamed == [(0, [10, 11, 12]), (1, [20, 21, 22, 23, 24])]  # slot order: the whole answer, a growing one
    assert slots.owner == [None, 1]


def test_a_new_run_starts_with_every_slot_free_and_its_own_stops():
    slots = Slots(2, 16, "cpu")
    slots.begin([[1] * 2, [2] * 2, [3] * 2], caps=[4, 4, 4], stop_ids=[99])
    slots.refill()
    slots.begin([[5] * 2], caps=[6], stop_ids=[7, 8])
    assert slots.all_free() and list(slots.waiting) == [0]
    assert slots.limits.tolist() == [0, 0] and slots.stops.tolist() == [7, 8]


@pytest.mark.parametrize("lengths, budget, chunks", [
    ([10, 9, 5, 5, 3], 20, [(0, 2, 10), (2, 5, 5)]),  # 2 x 10 fits 20 tokens, 3 x 10 would not
    ([10, 9, 5, 5, 3], 15, [(0, 1, 10), (1, 2, 9), (2, 5, 5)]),
    ([50, 4], 20, [(0, 1, 50), (1, 2, 4)]),  # a prompt longer than the budget is read alone
    ([4, 4, 4], 10_000, [(0, 3, 4)]),
    ([], 100, []),
])
def test_prefill_chunks_keep_rows_times_width_within_the_budget(lengths, budget, chunks):
    assert prefill_chunks(lengths, budget) == chunks
    assert [k for start, end, _ in chunks for k in range(start, end)] == list(range(len(lengths)))
    for start, end, width in chunks:
        assert width == max(lengths[start:end])
        assert end - start == 1 or (end - start) * width <= budget
