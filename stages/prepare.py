"""Prepare: read PubMedQA-format rows, clean, split, render chats, count tokens.

    python -m stages.prepare        (or: dvc repro prepare)

Reads `data.source` (hub id or local file) and the tokenizer of `model.name`; writes
data/prepared/{train,validation,test}.jsonl and metrics/info/prepare.json (row counts, drops,
truncations, token lengths, source hash: facts about the data, not metrics to compare).
"""

from __future__ import annotations

import logging
import time

from stages import paths
from stages.cli import no_arguments
from stages.errors import UserError, stage_entrypoint
from stages.modeling import load_tokenizer
from stages.outputs import check_writable, jsonl_text, staged
from stages.params import load_params
from stages.prompt import build_messages, encode, render_prompt_completion
from stages.records import clean_records, content_hash, read_records, split_rows

log = logging.getLogger("stages.prepare")

MAX_FIT_ATTEMPTS = 8


def _render(tokenizer, system, row, contexts, include_contexts):
    messages = build_messages(system, row["question"], contexts, include_contexts, row["answer"])
    prompt, completion = render_prompt_completion(tokenizer, messages)
    return prompt, completion, len(encode(tokenizer, prompt)) + len(encode(tokenizer, completion))


def fit_row(tokenizer, row: dict, system: str, include_contexts: bool, max_tokens: int) -> dict | None:
    """Render one row within max_tokens, shortening the abstract (never the answer).

    Returns the prepared row, or None when even the question and answer alone do not fit.
    """
    contexts = row["contexts"]
    for attempt in range(MAX_FIT_ATTEMPTS):
        prompt, completion, n_tokens = _render(tokenizer, system, row, contexts, include_contexts)
        if n_tokens <= max_tokens:
            return {
                **row,
                "contexts": contexts,
                "prompt": prompt,
                "completion": completion,
                "n_tokens": n_tokens,
                "truncated": contexts != row["contexts"],
            }
        if not include_contexts or not contexts:
            return None
        abstract_ids = encode(tokenizer, "\n\n".join(contexts))
        # Cut the excess from the end of the abstract; re-tokenising can merge differently at
        # the cut, so each further attempt cuts a little more.
        keep = len(abstract_ids) - (n_tokens - max_tokens) - 4 * attempt
        text = tokenizer.decode(abstract_ids[:max(keep, 0)]).rstrip("\ufffd").strip()
        contexts = [p.strip() for p in text.split("\n\n") if p.strip()]
    return None


def token_stats(rows: list[dict]) -> dict[str, int]:
    lengths = sorted(r["n_tokens"] for r in rows)
    at = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731 nearest rank
    return {"p50": at(0.5), "p95": at(0.95), "max": lengths[-1]}


@stage_entrypoint
def main() -> None:
    params = load_params()
    data_params = params.data
    started = time.perf_counter()
    check_writable(paths.PREPARED_DIR, paths.PREPARE_INFO)

    tokenizer = load_tokenizer(params.model.name)
    records = read_records(data_params.source, data_params.split, data_params.revision)
    rows, dropped, invalid_decisions = clean_records(records, data_params.min_chars)
    log.info("read %d rows from %s; %d kept after cleaning", len(records), data_params.source, len(rows))

    prepared = []
    for row in rows:
        fitted = fit_row(tokenizer, row, params.prompt.system, data_params.include_contexts,
                         params.model.max_seq_length)
        if fitted is None:
            dropped["too_long"] += 1
        else:
            prepared.append(fitted)
    if not prepared:
        raise UserError(f"no row fits model.max_seq_length = {params.model.max_seq_length} tokens")
    splits = split_rows(prepared, data_params.val_size, data_params.test_size, data_params.split_seed, dropped)

    stats = {name: token_stats(members) for name, members in splits.items()}
    summary = {
        "source_sha256": content_hash(records),
        "rows": {"read": len(records), "kept": len(prepared), **{n: len(m) for n, m in splits.items()}},
        "dropped": dict(dropped),
        # final_decision other than yes/no/maybe: the row is kept, without a decision label
        "invalid_final_decision": invalid_decisions,
        "truncated": {n: sum(r["truncated"] for r in m) for n, m in splits.items()},
        **{
            f"tokens_{stat}": {name: stats[name][stat] for name in splits}
            for stat in ("p50", "p95", "max")
        },
    }
    with staged() as out:
        out_dir = out.dir(paths.PREPARED_DIR)
        for name, members in splits.items():
            paths.split_file(name, out_dir).write_text(jsonl_text(members), encoding="utf-8")
        out.json(paths.PREPARE_INFO, summary)
    log.info(
        "wrote %s: train/validation/test = %d/%d/%d rows, %d truncated, dropped %s (%.1fs)",
        paths.PREPARED_DIR, *(len(splits[n]) for n in paths.SPLITS),
        sum(summary["truncated"].values()), dict(+dropped), time.perf_counter() - started,
    )


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
