"""Where a decoding step of the fast loop spends its time: graph replays at a few slot counts and
KV widths, two ways of writing the KV cache, and torch.profiler over three eager steps.

    python benchmarks/profile_decoding.py        (on a GPU host; prints its results)

Run by hand on one H200 on 2026-11-26; its output is results/2026-11-26-h200-decode-profile.txt.
"""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, ".")  # run from the repository root
from benchmarks.random_llama import build
from stages.modeling import load_for_inference
import stages.decoding as dec
d = Path("/tmp/llama8b")
if not (d / "config.json").exists():
    build(d); torch.cuda.empty_cache()
model = load_for_inference(str(d), "m")

def flat_update(self, key_states, value_states, layer_idx, *a, **k):
    keys, values = self.keys[layer_idx], self.values[layer_idx]
    B, H, L, D = keys.shape
    idx = ((self.rows * H)[:, None] + torch.arange(H, device=keys.device)[None, :]) * L + self.positions[:, None]
    keys.view(B * H * L, D).index_copy_(0, idx.view(-1), key_states.reshape(B * H, D))
    values.view(B * H * L, D).index_copy_(0, idx.view(-1), value_states.reshape(B * H, D))
    return keys, values

orig = dec.SlotCache.update
for name, upd in (("index_put", orig), ("index_copy", flat_update)):
    dec.SlotCache.update = upd
    for B, L in ((16, 2048), (50, 2048), (16, 1024)):
        s = dec.SlotDecoder(model, B, L, 8192)
        prompts = [[5 + i % 7] * (300 + 20 * i) for i in range(B)]
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.inference_mode():
            for chunk in dec.prefill(model, s.cache, list(enumerate(prompts))[::-1], 8192):
                s.slots.start(*chunk)
        torch.cuda.synchronize(); print(f"prefill {sum(map(len, prompts))} tokens: {time.perf_counter() - t:.2f}s")
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(50): s.step.graph.replay()
        torch.cuda.synchronize(); ms = (time.perf_counter() - t) / 50 * 1000
        print(f"{name} B={B} L={L}: {ms:.2f} ms/step, {B/ms*1000:.0f} tok/s", flush=True)
        del s; torch.cuda.empty_cache()
dec.SlotCache.update = orig
s = dec.SlotDecoder(model, 16, 2048, 8192)
for chunk in dec.prefill(model, s.cache, list(enumerate([[7] * 1000] * 16)), 8192):
    s.slots.start(*chunk)
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with torch.inference_mode(), dec._decode_attention(model):
    for _ in range(2): s.step.forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(3): s.step.forward()
        torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
