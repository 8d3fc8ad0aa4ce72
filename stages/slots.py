"""Slot bookkeeping of the fast decoding loop (stages/decoding.py), without the model.

Host side: which prompt each slot answers, the prompts still waiting (longest first, so rows of
similar width prefill together), and the answers taken out as they end. Device side: for every
slot the token it feeds next, its position in the KV cache, how many answer tokens it has written
and which (`history`), and its cap. `record` is the only part inside the captured decoding step:
it changes these tensors in place and never waits for the GPU; `collect` is the one look per
CHECK_EVERY steps that does.

A slot that is free keeps running with the others (a CUDA graph replays all of them): its position
stays at the last column of its KV row, and its writes are never read, since its next prompt's
prefill overwrites the row and a slot only ever reads the `generated` tokens it wrote itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


def until_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token, and whether one came (else the cap cut the answer)."""
    for k, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:k], True
    return tokens, False


class Slots:
    """`count` answers written at once, each in a row of `max_len` tokens on `device`."""

    def __init__(self, count: int, max_len: int, device):
        import torch

        self.count, self.max_len = count, max_len
        zeros = lambda: torch.zeros(count, dtype=torch.long, device=device)  # noqa: E731
        self.tokens, self.positions, self.generated, self.limits = zeros(), zeros(), zeros(), zeros()
        self.rows = torch.arange(count, device=device)
        self.columns = torch.arange(max_len, device=device)
        self.history = torch.zeros(count, max_len, dtype=torch.long, device=device)  # answer tokens, from column 0
        self.stops = torch.zeros(0, dtype=torch.long, device=device)
        self.owner: list[int | None] = [None] * count  # the prompt each slot is answering
        self.waiting: deque[int] = deque()
        self.prompts: list[list[int]] = []
        self.caps: list[int] = []
        self.stop_ids: list[int] = []

    def begin(self, prompts: list[list[int]], caps: list[int], stop_ids: list[int]) -> None:
        """Queue a run's prompts, every slot free."""
        import torch

        self.prompts, self.caps, self.stop_ids = prompts, caps, stop_ids
        self.waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))  # similar widths prefill together
        self.owner = [None] * self.count
        self.stops = torch.tensor(stop_ids, device=self.rows.device)
        self.limits.zero_()

    def busy(self) -> bool:
        """Prompts still waiting or answers still being written."""
        return bool(self.waiting) or not self.all_free()

    def all_free(self) -> bool:
        return all(index is None for index in self.owner)

    def refill(self) -> list[tuple[int, list[int]]]:
        """Give every free slot the next waiting prompt: (slot, prompt tokens) for each, to prefill."""
        assignments = []
        for slot in range(self.count):
            if self.owner[slot] is None and self.waiting:
                self.owner[slot] = self.waiting.popleft()
                assignments.append((slot, self.prompts[self.owner[slot]]))
                self.limits[slot] = self.caps[self.owner[slot]]
        return assignments

    def start(self, slots, first, lengths) -> None:
        """After a prefill: each slot (a tensor of slot numbers) feeds its first answer token next,
        at the position just past its prompt of `lengths` tokens."""
        self.tokens[slots] = first
        self.positions[slots] = lengths
        self.history[slots, 0] = first
        self.generated[slots] = 1

    def record(self, chosen) -> None:
        """Inside the decoding step: each slot wrote `chosen`; in place, nothing waits for the GPU.
        A free slot's counters run on, clamped to its row."""
        self.history[self.rows, self.generated.clamp(max=self.max_len - 1)] = chosen
        self.generated.add_(1)
        self.tokens.copy_(chosen)
        self.positions.copy_((self.positions + 1).clamp(max=self.max_len - 1))

    def clear(self) -> None:
        """Forget the steps run before any prompt (the CUDA graph's warm-up and capture)."""
        for state in (self.tokens, self.positions, self.generated):
            state.zero_()

    def finished(self):
        """Per slot: it wrote a stop token in this answer (a refilled row still holds the tokens of
        the answers before it, past `generated`), or reached its cap."""
        import torch

        written = self.columns[None, :] < self.generated[:, None]
        stopped = (torch.isin(self.history, self.stops) & written).any(dim=1)
        return stopped | (self.generated >= self.limits)

    def collect(self, stream: Callable[[int, list[int]], None] | None = None) -> list[tuple[int, list[int], bool]]:
        """Take out each answer that wrote a stop token or reached its cap, freeing its slot:
        (prompt index, tokens before the stop, whether a stop came) for each. stream(prompt index,
        tokens so far) is called for every answer still growing, and once with each whole answer."""
        import torch

        # one wait for the GPU per look, then one copy of the rows to take out (if any)
        done, generated = torch.stack([self.finished().to(self.generated.dtype), self.generated]).tolist()
        taken = [slot for slot, index in enumerate(self.owner) if index is not None and (done[slot] or stream)]
        rows = dict(zip(taken, self.history[taken].tolist())) if taken else {}
        ended = []
        for slot, row in rows.items():
            index = self.owner[slot]
            tokens = row[: min(generated[slot], self.caps[index])]
            if not done[slot]:
                stream(index, tokens)  # a growing answer
                continue
            answer, stopped = until_stop(tokens, self.stop_ids)
            ended.append((index, answer, stopped))
            self.owner[slot] = None
            if stream:
                stream(index, answer)
        return ended
