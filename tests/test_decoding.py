"""The fast decoding loop (stages/decoding.py) and its memory plan (stages/memory.py), on the CPU.

The loop runs eagerly here; on a GPU the same step is replayed from a CUDA graph (compared with
generate in float32 on an H100/H200 by benchmarks/bench_generation.py).
"""

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from stages import memory
from stages.decoding import SlotDecoder, unsupported
from stages.evaluation import generate_answers, stop_token_ids
from stages.modeling import load_for_inference
from stages.params import EvalParams
from stages.prompt import build_messages, encode, render_prompt
from tests.conftest import SAMPLE


def _prompts(tokenizer) -> list[list[int]]:
    """Seven prompts of clearly different lengths: abstracts cut at growing lengths."""
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))[:7]
    prompts = [render_prompt(tokenizer, build_messages("", r["QUESTION"], [r["CONTEXTS"][0][: 40 + 60 * i]], True))
               for i, r in enumerate(records)]
    return [encode(tokenizer, p) for p in prompts]


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    model = load_for_inference(str(tiny_model), "model.name")
    return model, tiny_tokenizer, _prompts(tiny_tokenizer)


def _generate_one(model, ids, cap, stop_ids):
    """transformers' greedy generate on one prompt, cut at its first stop token."""
    import torch

    output = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=cap, do_sample=False, temperature=None, top_p=None, top_k=None,
                            eos_token_id=stop_ids, pad_token_id=0)
    tokens = output[0, len(ids):].tolist()
    ends = [k for k, token in enumerate(tokens) if token in stop_ids]
    return tokens[: ends[0]] if ends else tokens


def _case(model, prompts):
    """Caps that differ per prompt, and a stop token the random model writes in the middle of some answers."""
    caps = [9, 30, 17, 24, 5, 28, 21]
    free = [_generate_one(model, ids, cap, [10**6]) for ids, cap in zip(prompts, caps)]
    counts = Counter(token for tokens in free for token in tokens[2:])
    stop = counts.most_common(1)[0][0]
    return caps, [stop], [_generate_one(model, ids, cap, [stop]) for ids, cap in zip(prompts, caps)]


@pytest.mark.parametrize("continuous", [True, False])
def test_the_loop_writes_what_generate_writes_in_input_order(setup, continuous):
    model, _, prompts = setup
    caps, stops, reference = _case(model, prompts)
    ended = [len(r) < cap for r, cap in zip(reference, caps)]
    assert any(ended) and not all(ended), "some answers must stop early and some run into their cap"
    assert len({tuple(r) for r in reference}) == len(reference), "distinct answers, or a reordering could not show"
    # 3 slots for 7 prompts: slots are refilled while others are still writing (or, static, between batches)
    decoder = SlotDecoder(model, slots=3, max_len=max(map(len, prompts)) + max(caps) + 8, prefill_tokens=300)
    answers, stats = decoder.run(prompts, caps, stops, continuous=continuous)
    assert answers == reference
    assert stats.cut_off == [not e for e in ended]
    assert stats.new_tokens == sum(map(len, reference)) and stats.slots == 3


def test_streamed_tokens_grow_into_each_answer(setup):
    model, _, prompts = setup
    caps, stops, reference = _case(model, prompts)
    seen: dict[int, list[list[int]]] = {}
    decoder = SlotDecoder(model, slots=2, max_len=max(map(len, prompts)) + max(caps) + 8, prefill_tokens=10_000)
    answers, _ = decoder.run(prompts, caps, stops, stream=lambda index, tokens: seen.setdefault(index, []).append(tokens))
    assert answers == reference
    for index, calls in seen.items():
        assert calls[-1] == reference[index]  # the last call holds the whole answer
        assert all(later[: len(earlier)] == earlier for earlier, later in zip(calls, calls[1:]))
    assert any(len(calls) > 1 for calls in seen.values()), "long answers are streamed in several pieces"


def test_a_prompt_that_does_not_fit_is_refused(setup):
    model, _, prompts = setup
    decoder = SlotDecoder(model, slots=1, max_len=len(prompts[0]) + 8, prefill_tokens=100)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.run(prompts[:1], [5], [0])


LATE = 24  # a late stop token: none of the free answers writes it among its first LATE tokens
FREE_TOKENS = 100  # the longest cap below


def _free_and_late_stops(model, prompts):
    """generate's free answers (no stop token, FREE_TOKENS each) and up to three stop tokens that
    the random model first writes late in several of them (the most answers first)."""
    free = [_generate_one(model, ids, FREE_TOKENS, [10**6]) for ids in prompts]
    late = {t for tokens in free for t in tokens} - {t for tokens in free for t in tokens[:LATE]}
    stops = sorted(late, key=lambda t: (-sum(t in tokens for tokens in free), t))[:3]
    return free, stops


@pytest.fixture(scope="module")
def late_case(setup):
    model, _, prompts = setup
    return _free_and_late_stops(model, prompts)


def _expected(free, caps, stops):
    """What generate writes with these caps and stop tokens (greedy: the free answer, cut at its
    first stop token or its cap), and which answers the cap cut off."""
    answers, cut_off = [], []
    for tokens, cap in zip(free, caps):
        ends = [k for k, token in enumerate(tokens[:cap]) if token in stops]
        answers.append(tokens[: ends[0]] if ends else tokens[:cap])
        cut_off.append(not ends)
    return answers, cut_off


def test_late_stops_and_refills_after_a_first_answer_ended_write_what_generate_writes(setup, late_case):
    # A slot keeps its finished answer's tokens, the stop token among them, past where the next
    # answer has written: only the tokens written for the answer at hand may end it.
    model, _, prompts = setup
    _check_late_stops_and_refills(model, prompts, *late_case)


def _check_late_stops_and_refills(model, prompts, free, stops):
    caps = [60, 80, 45, 70, 100, 100, 50]
    reference, cut_off = _expected(free, caps, stops)
    ends = [len(answer) for answer, cut in zip(reference, cut_off) if not cut]
    assert len(ends) >= 3 and min(ends) >= LATE and any(cut_off), "late stops in several answers, caps in others"
    first_wave = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))[:2]  # the loop starts with the longest
    assert not all(cut_off[i] for i in first_wave), "a slot's first answer ends at a stop token, then it is refilled"
    decoder = SlotDecoder(model, slots=2, max_len=max(map(len, prompts)) + max(caps) + 8, prefill_tokens=300)
    answers, stats = decoder.run(prompts, caps, stops)
    assert answers == reference
    assert stats.cut_off == cut_off
    assert stats.new_tokens == sum(map(len, reference))


def _scenario(prompts, free, stops):
    """The longest prompt, whose answer ends early at a late stop, and the prompts whose answers
    run FREE_TOKENS tokens without one (longest prompt first)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    early = order[0]
    _, cut_off = _expected(free, [FREE_TOKENS] * len(free), stops)
    assert not cut_off[early], "the longest prompt's answer ends at a stop token"
    return early, [i for i in order if cut_off[i]]


def test_an_idle_slot_past_max_len_leaves_the_other_answer_as_generate_writes_it(setup, late_case):
    # The slot of the answer that ended keeps stepping (a CUDA graph runs all slots) while the
    # other writes on: its position goes past max_len, and must stay inside its row.
    model, _, prompts = setup
    free, stops = late_case
    early, long_ = _scenario(prompts, free, stops)
    items, caps = [prompts[early], prompts[long_[0]]], [50, FREE_TOKENS]
    reference, cut_off = _expected([free[early], free[long_[0]]], caps, stops)
    max_len = max(len(ids) + cap + 8 for ids, cap in zip(items, caps))
    assert len(items[0]) + len(reference[1]) > max_len + 8, "the idle slot steps well past max_len"
    answers, stats = SlotDecoder(model, slots=2, max_len=max_len, prefill_tokens=1000).run(items, caps, stops)
    assert answers == reference and stats.cut_off == cut_off == [False, True]


@pytest.mark.parametrize("continuous", [True, False])
def test_a_slot_is_refilled_while_another_answer_is_still_written(setup, late_case, continuous):
    # Two slots, three prompts: the first answer ends early; continuous batching gives its slot the
    # third prompt at once, while the second answer still runs. Static batches make it wait.
    model, _, prompts = setup
    free, stops = late_case
    early, long_ = _scenario(prompts, free, stops)
    order = [early, long_[0], long_[1]]  # prefilled in this order: prompts longest first
    items, caps = [prompts[i] for i in order], [50, FREE_TOKENS, 40]
    reference, _ = _expected([free[i] for i in order], caps, stops)
    assert len(reference[0]) + 2 * 8 < len(reference[1]), "the first answer ends looks before the second"
    calls = []
    decoder = SlotDecoder(model, slots=2, max_len=max(map(len, items)) + FREE_TOKENS + 8, prefill_tokens=1000)
    answers, _ = decoder.run(items, caps, stops, continuous=continuous,
                             stream=lambda index, tokens: calls.append((index, list(tokens))))
    assert answers == reference
    third_starts = next(k for k, (index, _) in enumerate(calls) if index == 2)
    second_ends = calls.index((1, reference[1]))
    assert calls[second_ends + 1:] == ([] if continuous else [call for call in calls if call[0] == 2])
    assert (third_starts < second_ends) == continuous


def test_prefill_puts_each_prompt_in_its_slot_as_if_it_were_read_alone(setup, late_case):
    import torch
    from transformers import DynamicCache

    from stages.decoding import SlotCache, prefill
    from stages.slots import Slots

    model, _, prompts = setup
    free, _ = late_case
    slots = Slots(3, 256, model.device)
    cache = SlotCache(model, slots)
    assignments = [(2, prompts[6]), (0, prompts[0]), (1, prompts[5])]
    assert [len(ids) for _, ids in assignments] == [212, 139, 208]
    with torch.inference_mode():
        passes = [[t.tolist() for t in chunk] for chunk in prefill(model, cache, assignments, 450)]
    # (slots, first answer tokens, prompt lengths) per pass: 2 x 212 tokens fit 450, 3 x 212 would not
    assert passes == [[[2, 0], [free[6][0], free[0][0]], [212, 139]], [[1], [free[5][0]], [208]]]
    for slot, ids in assignments:
        alone = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), past_key_values=alone, use_cache=True)
        for layer, cached in enumerate(alone.layers):  # the padding of the shorter prompt changed nothing
            torch.testing.assert_close(cache.keys[layer][slot, :, :len(ids)], cached.keys[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.values[layer][slot, :, :len(ids)], cached.values[0], rtol=1e-4, atol=1e-5)


def test_the_decoding_step_writes_each_slots_token_and_keys_at_its_own_position(setup, late_case):
    import torch
    from transformers import DynamicCache

    from stages.decoding import DecodeStep, SlotCache, prefill
    from stages.slots import Slots

    model, _, prompts = setup
    free, _ = late_case
    slots = Slots(3, 256, model.device)
    cache = SlotCache(model, slots)
    step = DecodeStep(model, slots, cache)
    assert step.graph is None  # on a CPU the step runs eagerly
    with torch.inference_mode():
        for chunk in prefill(model, cache, [(0, prompts[6]), (2, prompts[0])], 10_000):
            slots.start(*chunk)
        step.advance(5)  # slot 1 holds no prompt: it steps along
    assert slots.history[0, :6].tolist() == free[6][:6] and slots.history[2, :6].tolist() == free[0][:6]
    assert slots.positions.tolist() == [len(prompts[6]) + 5, 5, len(prompts[0]) + 5] and slots.generated.tolist() == [6, 5, 6]
    for slot, i in ((0, 6), (2, 0)):  # the answer's keys and values: those of one pass over prompt and answer
        ids = prompts[i] + free[i][:5]
        whole = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), past_key_values=whole, use_cache=True)
        for layer, cached in enumerate(whole.layers):
            torch.testing.assert_close(cache.keys[layer][slot, :, :len(ids)], cached.keys[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.values[layer][slot, :, :len(ids)], cached.values[0], rtol=1e-4, atol=1e-5)


def test_sampling_the_param_and_other_models_go_through_generate(setup):
    import transformers

    model, tokenizer, _ = setup
    prompt = [tokenizer.decode(setup[2][1])]
    assert unsupported(model) is None
    for update in ({"decoder": "generate"}, {"do_sample": True}):
        _, stats = generate_answers(model, tokenizer, prompt, EvalParams(max_new_tokens=4, **update), 0)
        assert stats["decoder"] == "generate"
    small = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    refused = {  # the loop would run them wrong (stages/decoding.REFUSED), or knows nothing of them
        "Gemma 2 soft-caps": transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small)),
        "Gemma 3 gives its local and global layers":
            transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**small)),
        "model type 'phi3'": transformers.Phi3ForCausalLM(transformers.Phi3Config(**small)),
    }
    for reason, other in refused.items():
        assert unsupported(other).startswith(reason)  # what evaluation logs
        answers, stats = generate_answers(other.eval(), tokenizer, prompt, EvalParams(max_new_tokens=4), 0)
        assert stats["decoder"] == "generate" and len(answers) == 1


def _gpu_model(config):
    import torch

    weight = SimpleNamespace(dtype=torch.bfloat16)
    return SimpleNamespace(config=config, device=SimpleNamespace(type="cuda"),
                           get_input_embeddings=lambda: SimpleNamespace(weight=weight))


@pytest.fixture
def llama_8b():
    from transformers import LlamaConfig

    from benchmarks.random_model import LLAMA_31_8B

    return LlamaConfig(**LLAMA_31_8B)


@pytest.mark.parametrize("free_gib", [5.0, 7.5, 20.0, 60.0])
def test_auto_answers_fill_the_free_memory_and_no_more(llama_8b, monkeypatch, free_gib):
    # After the 8B weights (15 GiB) a 24 GiB card has ~7.5 GiB free, an 80 GiB one ~60.
    free = int(free_gib * memory.GIB)
    monkeypatch.setattr(memory, "free_bytes", lambda: free)
    model, max_len, longest = _gpu_model(llama_8b), 1792, 1536
    slots, prefill_tokens = memory.answer_plan(model, 500, longest, max_len, "auto")
    per_token = memory.kv_bytes_per_token(llama_8b, 2)
    assert per_token == 131072  # 32 layers x 8 KV heads x 128 x (key, value) x 2 bytes
    prefill = prefill_tokens * (2 * per_token + memory.forward_bytes_per_token(llama_8b, 2))
    per_answer = per_token * max_len + 8 * max_len + 8 * llama_8b.vocab_size
    budget = free - memory.RESERVE
    per_prefill_token = 2 * per_token + memory.forward_bytes_per_token(llama_8b, 2)
    assert prefill_tokens == max(longest, min(memory.PREFILL_TOKENS, budget // 4 // per_prefill_token))
    assert prefill_tokens == longest or prefill <= budget // 4  # a quarter of the budget, never less than one prompt
    if slots < memory.MAX_ANSWERS:  # the most that fit: one more would not
        assert slots == 1 or prefill + slots * per_answer <= budget
        assert prefill + (slots + 1) * per_answer > budget
    else:
        assert prefill + slots * per_answer <= budget
    assert memory.answer_plan(model, 3, longest, max_len, "auto")[0] <= 3  # never more slots than questions
    assert memory.answer_plan(model, 500, longest, max_len, 7)[0] == 7  # a number is taken as given


def test_the_generate_fallback_takes_fewer_rows_than_the_fast_loop(llama_8b, monkeypatch):
    # generate prefills whole prompts at once and copies its growing cache: measured 0.35 GiB a row
    # on the 8B model against 0.25 GiB a slot of the fast loop
    model = _gpu_model(llama_8b)
    for free_gib in (7.5, 60.0):
        monkeypatch.setattr(memory, "free_bytes", lambda gib=free_gib: int(gib * memory.GIB))
        slots, _ = memory.answer_plan(model, 500, 1536, 1792, "auto")
        rows = memory.generate_rows(model, 500, 1536, 1792, "auto")
        assert 1 <= rows < slots
        assert rows * 0.35 * memory.GIB <= free_gib * memory.GIB - memory.RESERVE
    assert memory.generate_rows(model, 500, 1536, 1792, 16) == 16


def test_auto_scoring_rows_fit_the_free_memory(llama_8b, monkeypatch):
    model = _gpu_model(llama_8b)
    per_row = 1600 * memory.forward_bytes_per_token(llama_8b, 2)
    budget = lambda gib: int(gib * memory.GIB) - memory.RESERVE - memory.logit_bytes(llama_8b)  # noqa: E731
    assert memory.logit_bytes(llama_8b) > 1e9  # the output layer's chunk is planned for, not a rounding error
    for free_gib, expected in ((8.0, budget(8.0) // per_row), (0.5, 1), (200.0, 64)):
        monkeypatch.setattr(memory, "free_bytes", lambda gib=free_gib: int(gib * memory.GIB))
        assert memory.scoring_rows(model, 1600, "auto") == max(1, min(64, expected))
    assert memory.scoring_rows(model, 1600, 5) == 5


def test_without_a_gpu_auto_means_a_fixed_batch(setup):
    model = setup[0]
    assert memory.answer_plan(model, 50, 100, 400, "auto") == (memory.CPU_BATCH, memory.PREFILL_TOKENS)
    assert memory.answer_plan(model, 3, 100, 400, "auto")[0] == 3
    assert memory.scoring_rows(model, 100, "auto") == memory.CPU_BATCH
    assert stop_token_ids(model, setup[1])  # the loop always has an end of turn to stop at


def test_scoring_through_the_output_layer_in_chunks_gives_the_same_log_probabilities(setup, monkeypatch):
    from stages.evaluation import completion_logprobs
    from stages.prompt import tokenize_example

    model, tokenizer, _ = setup
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))[:4]
    examples = [tokenize_example(tokenizer, render_prompt(tokenizer, build_messages("", r["QUESTION"], [], False)),
                                 r["LONG_ANSWER"]) for r in records]
    whole = completion_logprobs(model, tokenizer, examples, 4)
    monkeypatch.setattr(memory, "LOGIT_CHUNK", 3)  # every row's answer spans several chunks
    chunked = completion_logprobs(model, tokenizer, examples, 4)
    assert all(count > 3 for _, count in whole)
    assert [count for _, count in chunked] == [count for _, count in whole]
    assert [total for total, _ in chunked] == pytest.approx([total for total, _ in whole], rel=1e-5)


def test_the_plan_for_the_8b_model_on_a_24_gb_card_worked_by_hand(llama_8b, monkeypatch):
    # 7.5 GiB free after the weights, 3 GiB kept back: a budget of 4.5 GiB = 4,831,838,208 bytes.
    monkeypatch.setattr(memory, "free_bytes", lambda: int(7.5 * memory.GIB))
    model = _gpu_model(llama_8b)
    # a token's keys and values: 32 layers x 8 heads x 128 x 2 x 2 bytes = 131,072;
    # its widest activations: 2 bytes x (4 x 4096 + 6 x 32 x 128 + 3 x 14336) = 167,936;
    # one output-layer chunk: 1,024 positions x 128,256 x (2 + 4 + 4) bytes = 1,313,341,440
    assert memory.kv_bytes_per_token(llama_8b, 2) == 131_072
    assert memory.forward_bytes_per_token(llama_8b, 2) == 167_936
    assert memory.logit_bytes(llama_8b) == 1_313_341_440
    # prefill: a quarter of the budget at 2 x 131,072 + 167,936 = 430,080 bytes a token = 2,808 tokens;
    # an answer of 1,792 tokens: 131,072 x 1,792 + 8 x 1,792 + 8 x 128,256 = 235,921,408 bytes;
    # (4,831,838,208 - 2,808 x 430,080) // 235,921,408 = 15 answers at once
    assert memory.answer_plan(model, 500, 1536, 1792, "auto") == (15, 2808)
    # generate: 3 x 131,072 x 1,792 + 1,536 x 167,936 + 12 x 128,256 = 964,131,840 bytes a row: 5 rows
    assert memory.generate_rows(model, 500, 1536, 1792, "auto") == 5
    # scoring rows of 1,600 tokens: (4,831,838,208 - 1,313,341,440) // (1,600 x 167,936) = 13
    assert memory.scoring_rows(model, 1600, "auto") == 13


def test_free_bytes_on_this_device():
    import torch

    if not torch.cuda.is_available():
        # Nothing to read without CUDA, and the reading says so rather than inventing a number; the
        # planners never ask there (test_without_a_gpu_auto_means_a_fixed_batch).
        with pytest.raises((AssertionError, RuntimeError)):
            memory.free_bytes()
        return
    size = 256 * 2**20
    before = memory.free_bytes()
    assert 0 < before <= torch.cuda.mem_get_info()[1]
    block = torch.empty(size, dtype=torch.uint8, device="cuda")
    assert abs(memory.free_bytes() - (before - size)) <= 2 * 2**20  # taken, whether from the cache or the device
    del block  # back in PyTorch's cache, not on the device: still this process's to take
    assert abs(memory.free_bytes() - before) <= 2 * 2**20


def test_free_bytes_on_an_h100_holding_the_8b_model(llama_8b, monkeypatch):
    # torch.cuda's three readings in a process that loaded Llama-3.1-8B in bf16 on an H100 80GB:
    # - total 81,559 MiB (as nvidia-smi shows these H100s); the CUDA context and library handles
    #   take 560 MiB outside PyTorch's allocator, so the empty card reads 80,999 MiB (79.1 GiB) free;
    # - allocated: the weights, 8,030,261,248 parameters x 2 bytes = 16,060,522,496 bytes;
    # - reserved 15,876 MiB: the weights' segments and ~560 MiB of loading buffers freed into
    #   PyTorch's cache, which the device counts as used and this process can still take.
    import torch

    mib = 2**20
    reserved, allocated = 15_876 * mib, 8_030_261_248 * 2
    free = (81_559 - 560) * mib - reserved  # what cudaMemGetInfo reports: 65,123 MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (free, 81_559 * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *device: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *device: allocated)
    # 65,123 MiB free + 15,876 reserved - 15,316.49 allocated = 65,682.49 MiB (64.14 GiB); counting
    # the weights as free would give back the empty card's 79.1 GiB
    assert memory.free_bytes() == 68_873_084_928
    model = _gpu_model(llama_8b)
    # generate: (68,873,084,928 - 3 GiB reserve) // 964,131,840 bytes a row (see the 24 GB case) = 68 rows
    assert memory.generate_rows(model, 500, 1536, 1792, "auto") == 68
    # answers of up to 8,192 tokens: 131,072 x 8,192 + 8 x 8,192 + 8 x 128,256 = 1,074,833,408 bytes
    # each, after a prefill of 8,192 tokens x 430,080 bytes: 62,128,644,096 // 1,074,833,408 = 57
    assert memory.answer_plan(model, 500, 1536, 8192, "auto") == (57, 8192)


def test_the_plan_at_its_edges(llama_8b, monkeypatch, setup):
    from transformers import LlamaConfig

    model = _gpu_model(llama_8b)
    monkeypatch.setattr(memory, "free_bytes", lambda: int(3.2 * memory.GIB))  # next to nothing beyond the reserve
    assert memory.answer_plan(model, 500, 1536, 1792, "auto")[0] == 1  # one answer at a time, never zero
    assert memory.generate_rows(model, 500, 1536, 1792, "auto") == 1 and memory.scoring_rows(model, 1600, "auto") == 1
    assert memory.answer_plan(model, 1, 1536, 1792, 1)[0] == 1  # a number is taken as given on a GPU too
    monkeypatch.setattr(memory, "free_bytes", lambda: 400 * memory.GIB)  # far more than needed
    assert memory.answer_plan(model, 500, 100, 400, "auto")[0] == memory.MAX_ANSWERS
    assert memory.generate_rows(model, 500, 100, 400, "auto") == memory.MAX_ANSWERS
    assert memory.generate_rows(model, 7, 100, 400, "auto") == 7
    # a config whose head_dim is not hidden_size / heads (as Qwen3's): the cache follows head_dim
    wide = LlamaConfig(**{**llama_8b.to_dict(), "head_dim": 256})
    assert memory.kv_bytes_per_token(wide, 2) == 2 * memory.kv_bytes_per_token(llama_8b, 2)
    assert memory.forward_bytes_per_token(wide, 2) > memory.forward_bytes_per_token(llama_8b, 2)
    # without a GPU a number is taken as given, never more than the prompts
    cpu_model = setup[0]
    assert memory.answer_plan(cpu_model, 50, 100, 400, 3)[0] == 3
    assert memory.answer_plan(cpu_model, 1, 100, 400, "auto")[0] == 1
