"""A Llama-3.1-8B-shaped model with random weights, built locally, for speed and memory work.

    python -m benchmarks.random_llama OUT_DIR [--layers 32]

The published Llama-3.1-8B config (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV
heads, vocab 128256, llama3 rope) with random bf16 weights, saved as safetensors beside the tiny
test tokenizer (tools/tiny_model.py, Llama 3.1 special tokens and chat template). The numbers it
gives are the real model's speed and memory; its answers are noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tools.smoke import ROOT
from tools.tiny_model import DEFAULT_DATA, build_tokenizer, corpus_from

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


def build(out_dir: Path, layers: int = 32, device: str = "cuda") -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus_from(ROOT / DEFAULT_DATA))
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    config = LlamaConfig(**{**LLAMA_31_8B, "num_hidden_layers": layers}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=[eot, end], pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[eot, end],
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{out_dir}: {n_params / 1e9:.2f}B parameters, built and saved in {time.perf_counter() - started:.0f}s")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    build(args.out_dir, args.layers, args.device)


if __name__ == "__main__":
    main()
