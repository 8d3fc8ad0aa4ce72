"""Ask the fine-tuned model one question, streaming the answer to the terminal.

    python -m stages.predict "질문 ..." [--context "초록 문단" ...] [--adapter] [--max-new-tokens N]

Answers from models/merged/ (or, with --adapter, from models/adapter/ on `model.base_16bit`),
with the same system prompt and chat template as training and evaluation. Not a DVC stage: it
writes nothing.
"""

from __future__ import annotations

import argparse

from stages import paths
from stages.errors import UserError, stage_entrypoint
from stages.evaluation import stop_token_ids
from stages.modeling import load_for_inference, load_tokenizer
from stages.params import load_params
from stages.prompt import build_messages, encode, render_prompt


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", help="the question, in Korean as in training")
    parser.add_argument("--context", action="append", default=[], metavar="PARAGRAPH",
                        help="an abstract paragraph to answer from (repeat for several)")
    parser.add_argument("--adapter", action="store_true",
                        help="use models/adapter on model.base_16bit instead of models/merged")
    parser.add_argument("--max-new-tokens", type=int, help="answer length cap (default: eval.max_new_tokens)")
    return parser.parse_args(argv)


def load_answering_model(use_adapter: bool, base: str):
    if not use_adapter:
        if not (paths.MERGED_DIR / "config.json").exists():
            raise UserError(f"{paths.MERGED_DIR} is missing; run `dvc repro merge` first, or pass --adapter")
        return load_for_inference(str(paths.MERGED_DIR), "models/merged"), load_tokenizer(str(paths.MERGED_DIR))
    if not (paths.ADAPTER_DIR / "adapter_config.json").exists():
        raise UserError(f"{paths.ADAPTER_DIR} is missing; run `dvc repro train` first")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_for_inference(base, "model.base_16bit"), str(paths.ADAPTER_DIR))
    return model.eval(), load_tokenizer(str(paths.ADAPTER_DIR))


@stage_entrypoint
def main(argv=None) -> None:
    args = parse_args(argv)
    params = load_params()
    model, tokenizer = load_answering_model(args.adapter, params.model.base_16bit)
    import torch
    from transformers import TextStreamer

    messages = build_messages(params.prompt.system, args.question, args.context, bool(args.context))
    input_ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, messages))], device=model.device)
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=args.max_new_tokens or params.eval.max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )


if __name__ == "__main__":
    main()
