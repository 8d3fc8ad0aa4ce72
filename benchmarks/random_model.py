"""An 8B-shaped chat model with random weights, built locally, for speed and memory work.

    python -m benchmarks.random_model OUT_DIR [--family llama|qwen3] [--layers N]

A published 8B config with random bf16 weights, saved as safetensors beside the tiny test
tokenizer of the same family (tools/tiny_model.py: the family's special tokens and chat template):
- llama: Llama-3.1-8B (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab
  128256, llama3 rope; 8.03B parameters);
- qwen3: Qwen3-8B (hidden 4096, intermediate 12288, 36 layers, 32 heads, 8 KV heads of 128, q/k
  norms, vocab 151936, rope theta 1e6, untied head; 8.19B parameters).
The numbers it gives are the real model's speed and memory; its answers are noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tools.smoke import ROOT
from tools.tiny_model import DEFAULT_DATA, FAMILIES, build_tokenizer, corpus_from

LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
}

QWEN3_8B = {  # Qwen/Qwen3-8B's config.json (its q_norm and k_norm come with the architecture)
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}

SHAPES = {"llama": LLAMA_31_8B, "qwen3": QWEN3_8B}  # family -> config (tools/tiny_model.FAMILIES names its classes)
MODEL_DIRS = {"llama": Path("/tmp/llama8b"), "qwen3": Path("/tmp/qwen3-8b")}  # the benchmarks' default --model-dir


def build(out_dir: Path, layers: int | None = None, device: str = "cuda", family: str = "llama",
          **sizes) -> Path:
    """The family's 8B shape (`layers` decoder layers, default all; `sizes` overrides other config
    keys, e.g. hidden_size for a CPU check) saved in out_dir with the family's tiny tokenizer."""
    import torch
    import transformers
    from transformers import GenerationConfig

    spec = FAMILIES[family]
    tokenizer = build_tokenizer(corpus_from(ROOT / DEFAULT_DATA), family=family)
    stop = tokenizer.convert_tokens_to_ids(list(spec.stop_tokens))
    shape = {**SHAPES[family], **sizes, **({"num_hidden_layers": layers} if layers else {})}
    config = getattr(transformers, spec.config_class)(
        **shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = getattr(transformers, spec.model_class)(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{out_dir}: {family}, {n_params / 1e9:.2f}B parameters, built and saved in "
          f"{time.perf_counter() - started:.0f}s")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=sorted(SHAPES), default="llama")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the published count)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    build(args.out_dir, args.layers, args.device, args.family)


if __name__ == "__main__":
    main()
