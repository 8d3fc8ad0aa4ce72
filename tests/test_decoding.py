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


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    model, tokenizer = load_for_inference(str(tiny_model), "model.name"), tiny_tokenizer
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))[:7]
    # Prompts of clearly different lengths: abstracts cut at growing lengths.
    prompts = [render_prompt(tokenizer, build_messages("", r["QUESTION"], [r["CONTEXTS"][0][: 40 + 60 * i]], True))
               for i, r in enumerate(records)]
    return model, tokenizer, [encode(tokenizer, p) for p in prompts]


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


def test_sampling_other_models_and_the_param_go_through_generate(setup, tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    model, tokenizer, _ = setup
    prompt = [tokenizer.decode(setup[2][1])]
    assert unsupported(model) is None
    for update in ({"decoder": "generate"}, {"do_sample": True}):
        _, stats = generate_answers(model, tokenizer, prompt, EvalParams(max_new_tokens=4, **update), 0)
        assert stats["decoder"] == "generate"
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    assert "mistral" in unsupported(mistral)
    _, stats = generate_answers(mistral.eval(), tokenizer, prompt, EvalParams(max_new_tokens=4), 0)
    assert stats["decoder"] == "generate"


def _gpu_model(config):
    import torch

    weight = SimpleNamespace(dtype=torch.bfloat16)
    return SimpleNamespace(config=config, device=SimpleNamespace(type="cuda"),
                           get_input_embeddings=lambda: SimpleNamespace(weight=weight))


@pytest.fixture
def llama_8b():
    from transformers import LlamaConfig

    from benchmarks.random_llama import LLAMA_31_8B

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
