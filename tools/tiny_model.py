"""Build a tiny chat model on disk, for tests and the CPU smoke run: Llama 3.1-shaped by default.

    python -m tools.tiny_model OUT_DIR [--family llama|qwen3|gemma3|mistral|exaone4] [--data FILE]

A byte-level BPE tokenizer is trained on the sample data's Korean text, with the family's special
tokens and a chat template shaped like the family's own (the same turn markers, end of turn, bos
and system handling, without tool calling); a 2-layer model of the family's transformers config
class with random weights is saved beside it. Nothing is downloaded: it stands in for the real
model wherever the Hub cannot be reached. The templates are written here from the families'
published formats, so a test can check what the pipeline reads from each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stages import cli

DEFAULT_DATA = Path("data/sample/pubmedqa_ko_sample.json")


@dataclass(frozen=True)
class Family:
    """What a tiny model of one family needs: its tokens, its template, its config class."""

    config_class: str
    model_class: str
    special_tokens: tuple[str, ...]
    template: str
    end_of_turn: str  # what the template writes after an assistant message (the test's expectation)
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    adds_bos: bool = False  # whether tokenizer(text) prepends the bos, as the family's tokenizer does
    plain_tokens: tuple[str, ...] = ()  # added tokens that decode like text (Qwen3's <think>)
    stop_tokens: tuple[str, ...] = ()  # the generation config's eos ids
    config: dict = field(default_factory=dict)


# Llama 3.1's template without tool calling: the same headers, knowledge-date preamble in the
# system turn, trimmed contents and <|eot_id|> after every turn.
LLAMA_TEMPLATE = (
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

# Qwen3's: ChatML turns, a system turn only when given, an empty thinking block before the last
# answer, and `enable_thinking=false` putting that block into the generation prompt.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Gemma 3's: bos first, the system message folded into the first user turn by the template
# itself, the assistant called "model", <end_of_turn> and a newline after every turn.
GEMMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Gemma 2's: no system role at all (the pipeline must fold the system prompt in itself).
GEMMA2_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Mistral Instruct v0.3's: bos first, [INST] ... [/INST] around user turns, the system message
# put before the last user message, the answer after a space and closed by the eos </s>.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last or loop.revindex == 2 and system_message %}"
    "{{- '[INST] ' + (system_message + '\\n\\n' if system_message else '') + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# EXAONE 4.0's: [|role|] turn markers closed by [|endofturn|], an empty thinking block in
# non-reasoning mode (enable_thinking=false), as for Qwen3.
EXAONE4_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '[|assistant|]' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message['content'] + '[|endofturn|]\\n' }}"
    "{%- else %}"
    "{{- '[|' + message['role'] + '|]' + message['content'] + '[|endofturn|]\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[|assistant|]' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

FAMILIES = {
    "llama": Family(
        "LlamaConfig", "LlamaForCausalLM",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|finetune_right_pad_id|>"),
        LLAMA_TEMPLATE, "<|eot_id|>", bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        adds_bos=True, stop_tokens=("<|eot_id|>", "<|end_of_text|>"), config={"tie_word_embeddings": False},
    ),
    "qwen3": Family(
        "Qwen3Config", "Qwen3ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        QWEN3_TEMPLATE, "<|im_end|>", eos="<|im_end|>", pad="<|endoftext|>", plain_tokens=("<think>", "</think>"),
        stop_tokens=("<|im_end|>", "<|endoftext|>"), config={"head_dim": 16, "tie_word_embeddings": False},
    ),
    "gemma3": Family(
        "Gemma3TextConfig", "Gemma3ForCausalLM", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        GEMMA3_TEMPLATE, "<end_of_turn>", bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", adds_bos=True,
        stop_tokens=("<eos>", "<end_of_turn>"),
        config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32,
                "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "mistral": Family(
        "MistralConfig", "MistralForCausalLM", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        MISTRAL_TEMPLATE, "</s>", bos="<s>", eos="</s>", unk="<unk>", adds_bos=True, stop_tokens=("</s>",),
        config={"sliding_window": None, "tie_word_embeddings": False},
    ),
    "exaone4": Family(
        "Exaone4Config", "Exaone4ForCausalLM",
        ("[PAD]", "[BOS]", "[UNK]", "[|endofturn|]", "[|system|]", "[|user|]", "[|assistant|]"),
        EXAONE4_TEMPLATE, "[|endofturn|]", bos="[BOS]", eos="[|endofturn|]", pad="[PAD]", unk="[UNK]",
        plain_tokens=("<think>", "</think>"), stop_tokens=("[|endofturn|]",),
        config={"head_dim": 16, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"],
                "tie_word_embeddings": False},
    ),
}

# Kept for the benchmarks and tests that name Llama's pieces.
SPECIAL_TOKENS = list(FAMILIES["llama"].special_tokens)
CHAT_TEMPLATE = LLAMA_TEMPLATE


def corpus_from(data_file: Path) -> list[str]:
    records = json.loads(Path(data_file).read_text(encoding="utf-8"))
    texts = []
    for record in records:
        contexts = record.get("CONTEXTS") or []
        texts += [record.get("QUESTION") or "", record.get("LONG_ANSWER") or "", *contexts]
    return texts + ["질문: 초록: Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024"]


def build_tokenizer(texts: list[str], vocab_size: int = 1024, family: str = "llama"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    backend = Tokenizer(models.BPE(unk_token=spec.unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if spec.adds_bos:
        # As the family's tokenizer does, plain tokenizer(text) calls prepend the bos: a prompt that
        # already holds it and is encoded with special tokens would start with two.
        bos = spec.bos
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        **({"unk_token": spec.unk} if spec.unk else {}),
        chat_template=spec.template,
        model_max_length=131072,
    )
    if spec.plain_tokens:
        tokenizer.add_tokens(list(spec.plain_tokens))
    return tokenizer


def build_model(tokenizer, hidden_size: int = 64, seed: int = 0, *, intermediate_size: int | None = None,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, family: str = "llama"):
    import torch
    import transformers
    from transformers import GenerationConfig

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    stop = tokenizer.convert_tokens_to_ids(list(spec.stop_tokens))
    extra = dict(spec.config)
    if "layer_types" in extra:
        extra["layer_types"] = (extra["layer_types"] * layers)[:layers]
    config = getattr(transformers, spec.config_class)(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    model = getattr(transformers, spec.model_class)(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    return model


def build_tiny_model(out_dir: Path, data_file: Path = DEFAULT_DATA, seed: int = 0, family: str = "llama") -> Path:
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus_from(data_file), family=family)
    model = build_model(tokenizer, seed=seed, family=family)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = cli.parser(__spec__.name, __doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    print(build_tiny_model(args.out_dir, args.data, family=args.family))


if __name__ == "__main__":
    main()
