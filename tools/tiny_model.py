"""Build a tiny Llama-3.1-shaped chat model on disk, for tests and the CPU smoke run.

    python -m tools.tiny_model OUT_DIR [--data data/sample/pubmedqa_ko_sample.json]

A byte-level BPE tokenizer is trained on the sample data's Korean text, with Llama 3.1's special
tokens and a chat template shaped like Llama 3.1's; a 2-layer LlamaConfig model with random
weights is saved beside it. Nothing is downloaded: it stands in for the 8B model wherever the
Hub cannot be reached.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import cli

DEFAULT_DATA = Path("data/sample/pubmedqa_ko_sample.json")

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|finetune_right_pad_id|>",
]

# Llama 3.1's template without tool calling: the same headers, knowledge-date preamble in the
# system turn, trimmed contents and <|eot_id|> after every turn.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def corpus_from(data_file: Path) -> list[str]:
    records = json.loads(Path(data_file).read_text(encoding="utf-8"))
    texts = []
    for record in records:
        contexts = record.get("CONTEXTS") or []
        texts += [record.get("QUESTION") or "", record.get("LONG_ANSWER") or "", *contexts]
    return texts + ["질문: 초록: Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024"]


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # As Llama 3's tokenizer does, plain tokenizer(text) calls prepend <|begin_of_text|>: a prompt
    # that already holds it and is encoded with special tokens would start with two.
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )


def build_model(tokenizer, hidden_size: int = 64, seed: int = 0, *, intermediate_size: int | None = None,
                layers: int = 2, heads: int = 4, kv_heads: int = 2):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[eot, end],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[eot, end], pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def build_tiny_model(out_dir: Path, data_file: Path = DEFAULT_DATA, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus_from(data_file))
    model = build_model(tokenizer, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = cli.parser(__spec__.name, __doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    print(build_tiny_model(args.out_dir, args.data))


if __name__ == "__main__":
    main()
