"""Greedy answers at the card's speed: a slotted KV cache, continuous batching, one CUDA graph.

transformers' `generate` spends most of a decoding step launching kernels and, with a padding
mask, copying every key/value head once per query head. This loop keeps the model's own modules
(embeddings, decoder layers, final norm, head) and replaces only what is slow:
- the KV cache: one fixed buffer per layer with a slot per answer being written; a finished
  answer's slot takes the next prompt at once (continuous batching), so short answers never wait
  for long ones, and every row sits at its own position (no left padding);
- the attention of the one new token: a grouped matmul that reads each key/value head once;
- the launches: on a GPU the decoding step of all slots is captured once as a CUDA graph and
  replayed; on a CPU it runs eagerly (the same arithmetic, which the tests compare with generate).
Prompts are prefilled by the model's own forward (sdpa), a few at a time, right-padded.
Greedy only; sampling goes through `generate`. Families: Llama, Mistral, Ministral, Qwen2, Qwen3
and EXAONE 4 (WINDOWS), their sliding-window layers with a mask of their own; others, Gemma 2 and 3 among them
(REFUSED), go through `generate`, and `unsupported` says why.

Three pieces, each readable and tested on its own, and the loop that runs them (`SlotDecoder`):
the slots' bookkeeping (stages/slots.py: which prompt each slot answers, positions, written
tokens, refills, finished answers), `prefill` (prompts into their slots of the `SlotCache`), and
`DecodeStep` (one token for every slot: static buffers, CUDA graph capture and replay).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from stages.memory import head_dim
from stages.slots import Slots

ATTENTION = "slot_decode"
CHECK_EVERY = 8  # decoding steps between looks at which answers ended (each look waits for the GPU)
_MIN = -3.0e38  # additive mask value: exp() of it is 0 in float32


# The families whose decoder layers this loop runs unchanged (their own q/k norms, biases and
# rotary handling inside; attention through AttentionInterface; the head read as is), each with
# how its config says which layers attend through a sliding window. Each is compared with
# generate token for token (tests/test_decoding_families.py).
def _no_window(config) -> list[int | None]:
    return [None] * config.num_hidden_layers


def _every_layer(config) -> list[int | None]:  # as MistralModel: config.sliding_window, layer_types ignored
    return [getattr(config, "sliding_window", None)] * config.num_hidden_layers


def _by_layer_type(config) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    return [window if kind == "sliding_attention" else None for kind in config.layer_types[: config.num_hidden_layers]]


WINDOWS = {"llama": _no_window, "mistral": _every_layer, "ministral": _by_layer_type, "qwen2": _by_layer_type,
           "qwen3": _by_layer_type, "exaone4": _by_layer_type}
SUPPORTED_MODEL_TYPES = tuple(WINDOWS)
_GEMMA3 = ("Gemma 3 gives its local and global layers different rotary embeddings and may soft-cap its logits "
           "(the fast loop gives all layers one and reads the head as is)")
REFUSED = {  # families the loop would run wrong, and why
    "gemma2": "Gemma 2 soft-caps its attention scores and its logits (the fast loop's attention and head do not)",
    "gemma3_text": _GEMMA3, "gemma3": _GEMMA3,
}


def unsupported(model) -> str | None:
    """Why this loop cannot run `model` (then `generate` does), or None."""
    config = model.config
    if config.model_type in REFUSED:
        return REFUSED[config.model_type]
    if config.model_type not in WINDOWS:
        return f"model type {config.model_type!r} (the fast loop knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} is not laid out as a Llama causal LM"
    return None


def layer_windows(config) -> list[int | None]:
    """Per decoder layer, how many of the latest positions (its own included) a query attends to;
    None: all. As transformers' sliding-window mask: a query at p sees keys p - window + 1 .. p."""
    return WINDOWS[config.model_type](config)


def _grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of one query position per row; the query heads of a key/value head share one read."""
    import torch

    batch, heads, q_len, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1] * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling
    probs = (scores.float() + attention_mask).softmax(dim=-1).to(value.dtype)
    output = torch.matmul(probs, value).reshape(batch, heads, q_len, dim).transpose(1, 2)
    return output, None


@contextmanager
def _decode_attention(model):
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _grouped_attention)
    before = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before


class SlotCache:
    """The slots' KV cache: per layer a key and a value buffer of (slots, key/value heads, max_len,
    head_dim), in the model's dtype. The prefill writes whole prompts into it; in the decoding step
    it is what a decoder layer sees as its past_key_values: this step's key and value go to each
    slot's position, and the whole buffer comes back (positions past a slot's own are masked)."""

    def __init__(self, model, slots: Slots):
        import torch

        config, device = model.config, model.device
        dtype = model.get_input_embeddings().weight.dtype
        shape = (slots.count, config.num_key_value_heads, slots.max_len, head_dim(config))
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.positions = slots.rows, slots.positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key_states[:, :, 0]
        values[self.rows, :, self.positions] = value_states[:, :, 0]
        return keys, values

    def write(self, slots, layers, width: int) -> None:
        """A prefill's keys and values (a DynamicCache's layers, `width` columns) into `slots`' rows:
        padding lands past each prompt, where it is masked, then overwritten."""
        for layer, cached in enumerate(layers):
            self.keys[layer][slots, :, :width] = cached.keys
            self.values[layer][slots, :, :width] = cached.values


def prefill_chunks(lengths: list[int], budget: int) -> list[tuple[int, int, int]]:
    """Consecutive rows read in one forward pass, as (start, end, width): as many as keep rows x
    width (padding included) within `budget` tokens, never fewer than one. The queue is sorted by
    length, so rows of a pass have similar widths."""
    chunks, start = [], 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while end < len(lengths) and (end - start + 1) * max(width, lengths[end]) <= budget:
            width, end = max(width, lengths[end]), end + 1
        chunks.append((start, end, width))
        start = end
    return chunks


def prefill(model, cache: SlotCache, assignments: list[tuple[int, list[int]]], budget: int) -> Iterator[tuple]:
    """Put each (slot, prompt tokens) in its slot: the keys and values of the prompt, right-padded,
    a few prompts a pass. Yields each pass's (slots, first answer tokens, prompt lengths), tensors
    on the model's device, once its keys and values are in `cache`."""
    import torch
    from transformers import DynamicCache

    device = model.device
    for start, end, width in prefill_chunks([len(ids) for _, ids in assignments], budget):
        chunk = assignments[start:end]
        slots = torch.tensor([slot for slot, _ in chunk], device=device)
        lengths = torch.tensor([len(ids) for _, ids in chunk], device=device)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for _, ids in chunk], device=device)
        attention_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
        past = DynamicCache()  # not the config's: its sliding-window layers would keep only the window
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past,
                             use_cache=True).last_hidden_state
        first = model.lm_head(hidden[torch.arange(len(chunk), device=device), lengths - 1]).argmax(dim=-1)
        cache.write(slots, past.layers, width)
        yield slots, first, lengths


class DecodeStep:
    """One greedy token for every slot through the model's own layers, into `cache` and `slots`.
    On a GPU the step is captured once as a CUDA graph (static buffers: every tensor it touches
    lives as long as the decoder) and replayed; on a CPU it runs eagerly."""

    def __init__(self, model, slots: Slots, cache: SlotCache):
        self.model, self.slots, self.cache = model, slots, cache
        self.windows = layer_windows(model.config)
        self.graph = None
        if model.device.type == "cuda":
            self._capture()

    def forward(self) -> None:
        """The step itself, bookkept on the device (nothing here waits for the GPU)."""
        import torch

        model, slots = self.model, self.slots
        inner = model.model
        hidden = inner.embed_tokens(slots.tokens[:, None])
        position_ids = slots.positions[:, None]
        position_embeddings = inner.rotary_emb(hidden, position_ids)
        seen = slots.columns <= position_ids  # a slot's own tokens, up to the one it feeds now
        masks = {window: torch.where(seen if window is None else seen & (slots.columns > position_ids - window),
                                     0.0, _MIN)[:, None, None, :] for window in set(self.windows)}
        for layer, window in zip(inner.layers[: model.config.num_hidden_layers], self.windows):
            hidden = layer(hidden, attention_mask=masks[window], position_ids=position_ids, past_key_values=self.cache,
                           position_embeddings=position_embeddings)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        slots.record(model.lm_head(inner.norm(hidden[:, -1])).argmax(dim=-1))

    def _capture(self) -> None:
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), _decode_attention(self.model):
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph, as CUDA graph capture requires
                    self.forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.forward()
        self.slots.clear()

    def advance(self, steps: int) -> None:
        """`steps` tokens for every slot: graph replays on a GPU, eager steps on a CPU."""
        if self.graph is not None:
            for _ in range(steps):
                self.graph.replay()
            return
        with _decode_attention(self.model):
            for _ in range(steps):
                self.forward()


@dataclass
class DecodeStats:
    slots: int
    new_tokens: int = 0
    seconds: float = 0.0
    warmup_s: float = 0.0  # buffers and CUDA graph capture
    first_token_s: float | None = None  # from the start of run() to the first answer token
    cut_off: list[bool] = field(default_factory=list)


class SlotDecoder:
    """Greedy decoding of many prompts through `slots` rows of a static KV cache of `max_len` tokens."""

    def __init__(self, model, slots: int, max_len: int, prefill_tokens: int):
        self.model, self.max_len, self.prefill_tokens = model, max_len, prefill_tokens
        started = time.perf_counter()
        self.slots = Slots(slots, max_len, model.device)
        self.cache = SlotCache(model, self.slots)
        self.step = DecodeStep(model, self.slots, self.cache)
        self.warmup_s = time.perf_counter() - started

    def run(self, prompts: list[list[int]], caps: list[int], stop_ids: list[int], continuous: bool = True,
            stream: Callable[[int, list[int]], None] | None = None, progress: Callable[[int], None] | None = None
            ) -> tuple[list[list[int]], DecodeStats]:
        """Each prompt's answer tokens (up to its stop token, at most its cap), in input order.
        continuous=False refills slots only when all are free (static batches, for comparison);
        stream(prompt index, tokens so far) is called as answers grow, and once with each whole answer;
        progress(n) when n more answers are whole (a progress bar's update)."""
        import torch

        if any(len(ids) + cap + CHECK_EVERY > self.max_len for ids, cap in zip(prompts, caps)):
            raise ValueError("a prompt and its answer do not fit max_len")
        slots = self.slots
        stats = DecodeStats(slots=slots.count, warmup_s=self.warmup_s, cut_off=[False] * len(prompts))
        answers: list[list[int] | None] = [None] * len(prompts)
        slots.begin(prompts, caps, stop_ids)
        started = time.perf_counter()
        with torch.inference_mode():
            while slots.busy():
                if continuous or slots.all_free():
                    for chunk in prefill(self.model, self.cache, slots.refill(), self.prefill_tokens):
                        slots.start(*chunk)
                    if stats.first_token_s is None:
                        slots.history[0, 0].item()  # waits for the first prefill
                        stats.first_token_s = time.perf_counter() - started
                self.step.advance(CHECK_EVERY)
                whole = slots.collect(stream)
                for index, answer, stopped in whole:
                    answers[index], stats.cut_off[index] = answer, not stopped
                    stats.new_tokens += len(answer)
                if progress is not None and whole:
                    progress(len(whole))
        stats.seconds = time.perf_counter() - started
        return answers, stats
