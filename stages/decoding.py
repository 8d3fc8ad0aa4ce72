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
Greedy only; sampling goes through `generate`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from stages.memory import head_dim

SUPPORTED_MODEL_TYPES = ("llama",)  # decoder layers whose attention goes through AttentionInterface
ATTENTION = "slot_decode"
CHECK_EVERY = 8  # decoding steps between looks at which answers ended (each look waits for the GPU)
_MIN = -3.0e38  # additive mask value: exp() of it is 0 in float32


def unsupported(model) -> str | None:
    """Why this loop cannot run `model` (then `generate` does), or None."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (the fast loop knows {', '.join(SUPPORTED_MODEL_TYPES)})"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} is not laid out as a Llama causal LM"
    return None


def until_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token, and whether one came (else the cap cut the answer)."""
    for k, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:k], True
    return tokens, False


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


class _SlotCache:
    """What a decoder layer sees as its past_key_values: this step's key and value go to each slot's
    position, and the whole buffer comes back (positions past a slot's own are masked)."""

    def __init__(self, keys, values, rows, positions):
        self.keys, self.values, self.rows, self.positions = keys, values, rows, positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key_states[:, :, 0]
        values[self.rows, :, self.positions] = value_states[:, :, 0]
        return keys, values


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
        import torch

        self.model, self.slots, self.max_len, self.prefill_tokens = model, slots, max_len, prefill_tokens
        config, self.device = model.config, model.device
        dtype = model.get_input_embeddings().weight.dtype
        shape = (slots, config.num_key_value_heads, max_len, head_dim(config))
        started = time.perf_counter()
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        zeros = lambda: torch.zeros(slots, dtype=torch.long, device=self.device)  # noqa: E731
        self.tokens, self.positions, self.generated = zeros(), zeros(), zeros()
        self.rows = torch.arange(slots, device=self.device)
        self.columns = torch.arange(max_len, device=self.device)
        self.history = torch.zeros(slots, max_len, dtype=torch.long, device=self.device)
        self.cache = _SlotCache(self.keys, self.values, self.rows, self.positions)
        self.graph = None
        if self.device.type == "cuda":
            self._capture()
        self.warmup_s = time.perf_counter() - started

    def _step(self) -> None:
        """One token for every slot, bookkept on the device (nothing here waits for the GPU)."""
        import torch

        inner = self.model.model
        hidden = inner.embed_tokens(self.tokens[:, None])
        position_ids = self.positions[:, None]
        position_embeddings = inner.rotary_emb(hidden, position_ids)
        mask = torch.where(self.columns <= position_ids, 0.0, _MIN)[:, None, None, :]
        for layer in inner.layers[: self.model.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                           position_embeddings=position_embeddings)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        chosen = self.model.lm_head(inner.norm(hidden[:, -1])).argmax(dim=-1)
        self.history[self.rows, self.generated.clamp(max=self.max_len - 1)] = chosen
        self.generated.add_(1)
        self.tokens.copy_(chosen)
        self.positions.copy_((self.positions + 1).clamp(max=self.max_len - 1))

    def _capture(self) -> None:
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), _decode_attention(self.model):
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph, as CUDA graph capture requires
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
        for state in (self.tokens, self.positions, self.generated):
            state.zero_()

    def _advance(self, steps: int) -> None:
        if self.graph is not None:
            for _ in range(steps):
                self.graph.replay()
            return
        with _decode_attention(self.model):
            for _ in range(steps):
                self._step()

    def _prefill(self, assignments: list[tuple[int, list[int]]]) -> None:
        """Put each prompt in its slot: keys and values of the prompt, its first answer token."""
        import torch
        from transformers import DynamicCache

        start = 0
        while start < len(assignments):  # rows of similar width (the queue is sorted) up to the token budget
            end, width = start + 1, len(assignments[start][1])
            while end < len(assignments) and \
                    (end - start + 1) * max(width, len(assignments[end][1])) <= self.prefill_tokens:
                width, end = max(width, len(assignments[end][1])), end + 1
            chunk, start = assignments[start:end], end
            slots = torch.tensor([slot for slot, _ in chunk], device=self.device)
            lengths = torch.tensor([len(ids) for _, ids in chunk], device=self.device)
            input_ids = torch.tensor([ids + [0] * (width - len(ids)) for _, ids in chunk], device=self.device)
            attention_mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
            cache = DynamicCache(config=self.model.config)
            hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                      use_cache=True).last_hidden_state
            first = self.model.lm_head(hidden[torch.arange(len(chunk), device=self.device), lengths - 1])
            first = first.argmax(dim=-1)
            for layer, cached in enumerate(cache.layers):  # padding lands past each prompt: masked, then overwritten
                self.keys[layer][slots, :, :width] = cached.keys
                self.values[layer][slots, :, :width] = cached.values
            self.tokens[slots] = first
            self.positions[slots] = lengths
            self.history[slots, 0] = first
            self.generated[slots] = 1

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
        stats = DecodeStats(slots=self.slots, warmup_s=self.warmup_s, cut_off=[False] * len(prompts))
        answers: list[list[int] | None] = [None] * len(prompts)
        waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))  # similar widths prefill together
        owner: list[int | None] = [None] * self.slots  # the prompt each slot is answering
        self._stops = torch.tensor(stop_ids, device=self.device)
        self._limits = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        started = time.perf_counter()
        with torch.inference_mode():
            while waiting or any(index is not None for index in owner):
                if continuous or all(index is None for index in owner):
                    self._refill(owner, waiting, prompts, caps)
                    if stats.first_token_s is None:
                        self.history[0, 0].item()  # waits for the first prefill
                        stats.first_token_s = time.perf_counter() - started
                self._advance(CHECK_EVERY)
                free = owner.count(None)
                self._collect(owner, caps, stop_ids, answers, stats, stream)
                if progress is not None and owner.count(None) > free:
                    progress(owner.count(None) - free)  # each slot freed took out a whole answer
        stats.seconds = time.perf_counter() - started
        return answers, stats

    def _refill(self, owner: list[int | None], waiting: deque, prompts: list[list[int]], caps: list[int]) -> None:
        """Give every free slot the next waiting prompt, and prefill them together."""
        assignments = []
        for slot in range(self.slots):
            if owner[slot] is None and waiting:
                owner[slot] = waiting.popleft()
                assignments.append((slot, prompts[owner[slot]]))
                self._limits[slot] = caps[owner[slot]]
        if assignments:
            self._prefill(assignments)

    def _collect(self, owner, caps, stop_ids, answers, stats, stream) -> None:
        """Take out each answer that wrote a stop token or reached its cap, freeing its slot."""
        import torch

        written = self.columns[None, :] < self.generated[:, None]
        stopped = (torch.isin(self.history, self._stops) & written).any(dim=1)
        finished = stopped | (self.generated >= self._limits)
        # one wait for the GPU per look, then one copy of the rows to take out (if any)
        done, generated = torch.stack([finished.to(self.generated.dtype), self.generated]).tolist()
        taken = [slot for slot, index in enumerate(owner) if index is not None and (done[slot] or stream)]
        rows = dict(zip(taken, self.history[taken].tolist())) if taken else {}
        for slot, row in rows.items():
            index = owner[slot]
            tokens = row[: min(generated[slot], caps[index])]
            if not done[slot]:
                stream(index, tokens)  # a growing answer
                continue
            answers[index], stopped = until_stop(tokens, stop_ids)
            stats.cut_off[index] = not stopped
            stats.new_tokens += len(answers[index])
            owner[slot] = None
            if stream:
                stream(index, answers[index])
