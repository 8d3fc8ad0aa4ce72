"""Ask the fine-tuned model one question, streaming the answer to the terminal.

    python -m stages.predict "질문 ..." [--context "초록 문단" ...] [--adapter] [--max-new-tokens N]

Answers from models/merged/ (or, with --adapter, from models/adapter/ on `model.base_16bit`),
with the same system prompt and chat template as training and evaluation. It first says (on
stderr) which adapter and params the model comes from, as dvc.lock records them, and refuses a
model that dvc.lock does not describe: after `dvc exp apply` or `git checkout` + `dvc checkout`,
the uncached models/merged is the previous result's until `dvc repro merge` rebuilds it. Not a
DVC stage: it writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from stages import cli, dvclock, paths
from stages.errors import UserError, gpu_memory_advice, stage_entrypoint
from stages.evaluation import stop_token_ids
from stages.modeling import load_for_inference, load_tokenizer
from stages.params import load_params
from stages.prompt import build_messages, encode, render_prompt
from stages.records import normalize_text

log = logging.getLogger("stages.predict")


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__spec__.name, __doc__)
    parser.add_argument("question", help="the question, in Korean as in training")
    parser.add_argument("--context", action="append", default=[], metavar="PARAGRAPH",
                        help="an abstract paragraph to answer from (repeat for several)")
    parser.add_argument("--adapter", action="store_true",
                        help="use models/adapter on model.base_16bit instead of models/merged")
    parser.add_argument("--max-new-tokens", type=int, help="answer length cap (default: eval.max_new_tokens)")
    return parser.parse_args(argv)


def answering_folder(use_adapter: bool):
    """The folder whose tokenizer (and model, or adapter) answers; missing = one line saying what to run."""
    if use_adapter:
        if not (paths.ADAPTER_DIR / "adapter_config.json").exists():
            raise UserError(f"{paths.ADAPTER_DIR} is missing; run `dvc repro train` first")
        return paths.ADAPTER_DIR
    if not (paths.MERGED_DIR / "config.json").exists():
        raise UserError(f"{paths.MERGED_DIR} is missing; run `dvc repro merge` first, or pass --adapter")
    return paths.MERGED_DIR


SHOWN_PARAMS = ("lora.r", "lora.alpha", "train.learning_rate", "train.max_steps", "seed")


def _locked_param(entry: dict, dotted: str):
    """A param as dvc.lock records it for a stage: under its section, or under its dotted name."""
    recorded = entry.get("params", {}).get(str(paths.PARAMS_FILE), {})
    if dotted in recorded:
        return recorded[dotted]
    value = recorded
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _stale(stage: str, outputs_only: bool) -> bool:
    """Whether DVC's own status finds `stage` out of date (its outputs, or also its deps and params)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            status = dvclock.when_free(lambda: repo.status(targets=[stage]),
                                       f"predict needs it to check {stage}'s outputs against dvc.lock")
            changes = status.get(stage, [])
    except NotDvcRepoError:
        return False
    return any(isinstance(c, dict) and ("changed outs" in c or not outputs_only) for c in changes)


def provenance(use_adapter: bool, base: str) -> str:
    """One line naming the adapter and params the answering model comes from; refuses a stale one."""
    stages = {}
    if paths.DVC_LOCK.exists():
        stages = (yaml.safe_load(paths.DVC_LOCK.read_text(encoding="utf-8")) or {}).get("stages", {})
    stage, folder = ("train", paths.ADAPTER_DIR) if use_adapter else ("merge", paths.MERGED_DIR)
    if stage not in stages or "train" not in stages:
        return f"answering from {folder}, which dvc.lock does not record (built outside `dvc repro`)"
    if _stale(stage, outputs_only=use_adapter):  # the adapter is cached: checkout restores it, no retraining
        fix = "dvc checkout models/adapter" if use_adapter else "dvc repro merge"
        raise UserError(f"{folder} does not match dvc.lock (results were switched, or params changed since); "
                        f"run `{fix}` first")
    adapter = next(o["md5"] for o in stages["train"]["outs"] if o["path"] == str(paths.ADAPTER_DIR))
    shown = ", ".join(f"{key}={_locked_param(stages['train'], key)}" for key in SHOWN_PARAMS)
    if not use_adapter:
        base = _locked_param(stages["merge"], "model.base_16bit")
    return (f"answering from {folder}: adapter {adapter[:8]} ({shown}) "
            f"{'on' if use_adapter else 'merged into'} {base}, as dvc.lock records it")


def load_answering_model(use_adapter: bool, base: str, tokenizer):
    if not use_adapter:
        return load_for_inference(str(paths.MERGED_DIR), "models/merged", tokenizer=tokenizer)
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_for_inference(base, "model.base_16bit", tokenizer=tokenizer),
                                      str(paths.ADAPTER_DIR))
    return model.merge_and_unload().eval()  # in memory only: a plain model, which the fast loop runs


def prompt_ids(tokenizer, params, question: str, contexts: list[str], max_new_tokens: int) -> list[int]:
    """The question's prompt as token ids, after checking what the user typed."""
    question, contexts = normalize_text(question) or "", [normalize_text(c) for c in contexts]
    if not question:
        raise UserError("the question is empty; pass it in quotes: python -m stages.predict \"질문 ...\"")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens = {max_new_tokens}: give a positive number of tokens")
    contexts = [c for c in contexts if c]  # NFC as in prepare: macOS input may come decomposed (NFD)
    messages = build_messages(params.prompt.system, question, contexts, bool(contexts))
    ids = encode(tokenizer, render_prompt(tokenizer, messages))
    limit = params.model.max_seq_length
    if len(ids) + max_new_tokens > limit:
        raise UserError(
            f"the question and context take {len(ids)} tokens and the answer up to {max_new_tokens}: more than "
            f"the {limit} tokens (model.max_seq_length) the model was trained on; shorten the context "
            "or pass a smaller --max-new-tokens"
        )
    return ids


def out_of_memory_advice(max_new_tokens: int) -> str:
    return (f"out of GPU memory answering with --max-new-tokens {max_new_tokens}: pass a smaller "
            "--max-new-tokens (the answer's cache grows with it) or a shorter --context, or free the GPU")


def say_empty(new_tokens: int) -> None:
    """One line (on stderr, beside the provenance line) for an answer with no text, which would
    otherwise print as nothing at all."""
    print(f"the model's answer is empty: {new_tokens} new tokens, none of them text (it ended its turn "
          "at once, or wrote only white space or special tokens)", file=sys.stderr, flush=True)


class _Printer:
    """Prints a growing answer as it comes (as evaluation records it: stripped), holding back a
    character still missing bytes; `finish` makes sure the whole answer ends up printed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.printed = tokenizer, ""

    def __call__(self, index: int, tokens: list[int]) -> None:
        complete = self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip().rstrip("\ufffd")
        if complete.startswith(self.printed) and len(complete) > len(self.printed):
            print(complete[len(self.printed):], end="", flush=True)
            self.printed = complete

    def finish(self, tokens: list[int]) -> None:
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if not answer:
            say_empty(len(tokens))
        if answer.startswith(self.printed):
            print(answer[len(self.printed):], flush=True)
        else:  # decoding more tokens rewrote text already printed: the whole answer again
            print(f"\n{answer}", flush=True)


def answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> None:
    """Stream the greedy answer to stdout through the evaluation's fast loop (generate where it
    cannot run); log the time to the first token and the speed."""
    import torch

    from stages.decoding import CHECK_EVERY, SlotDecoder, unsupported

    stop_ids, refusal = stop_token_ids(model, tokenizer), unsupported(model)
    if refusal is None:
        printer = _Printer(tokenizer)
        decoder = SlotDecoder(model, 1, len(ids) + max_new_tokens + CHECK_EVERY, prefill_tokens=len(ids))
        [tokens], stats = decoder.run([ids], [max_new_tokens], stop_ids, stream=printer)
        printer.finish(tokens)
        log.info("first token %.2fs after the start (the prompt's %d tokens read), %d new tokens at %.1f tokens/s; "
                 "%.2fs of warm-up before", stats.first_token_s, len(ids), len(tokens),
                 len(tokens) / stats.seconds if stats.seconds else 0.0, stats.warmup_s)
        return
    from transformers import TextStreamer

    log.info("answering through transformers' generate: %s", refusal)
    input_ids = torch.tensor([ids], device=model.device)
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    new_tokens = output[0, len(ids):].tolist()
    if not tokenizer.decode(new_tokens, skip_special_tokens=True).strip():
        say_empty(len(new_tokens))


@stage_entrypoint
def main(argv=None) -> None:
    args = parse_args(argv)
    params = load_params()
    max_new_tokens = params.eval.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    folder = answering_folder(args.adapter)
    print(provenance(args.adapter, params.model.base_16bit), file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(str(folder), what=str(folder))
    ids = prompt_ids(tokenizer, params, args.question, args.context, max_new_tokens)
    model = load_answering_model(args.adapter, params.model.base_16bit, tokenizer)
    import torch

    with torch.inference_mode(), gpu_memory_advice(lambda: out_of_memory_advice(max_new_tokens)):
        answer(model, tokenizer, ids, max_new_tokens)


if __name__ == "__main__":
    main()
