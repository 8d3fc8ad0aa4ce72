"""Evaluate the base model: the baseline every fine-tuned run is compared with.

    python -m stages.evaluate_base  (or: dvc repro evaluate_base)

Scores `model.base_16bit` without any adapter exactly as stages/evaluate.py scores the merged
model; writes metrics/eval_base.json (quality, under `base`), metrics/cost/evaluate_base.json,
metrics/info/evaluate_base.json and metrics/predictions_base.jsonl (per question: answer, ROUGE,
answer loss, decision and option log-likelihoods, which evaluate pairs with its own). It
depends only on the prepared data and the model, prompt, seed and eval params, so experiments
on lora.* or train.* reuse it instead of rerunning it.
"""

from __future__ import annotations

import logging

from stages import paths
from stages.cli import no_arguments
from stages.errors import stage_entrypoint
from stages.evaluation import evaluate_model
from stages.modeling import load_for_inference, load_tokenizer
from stages.outputs import check_writable, jsonl_text, staged
from stages.params import load_params

log = logging.getLogger("stages.evaluate")


@stage_entrypoint
def main() -> None:
    params = load_params()
    check_writable(paths.BASE_PREDICTIONS, paths.EVAL_BASE_METRICS, paths.EVAL_BASE_INFO, paths.EVAL_BASE_COST)
    base = params.model.base_16bit
    tokenizer = load_tokenizer(base, what="model.base_16bit")
    model = load_for_inference(base, what="model.base_16bit", tokenizer=tokenizer)
    result = evaluate_model(model, tokenizer, params)
    with staged() as out:
        out.text(paths.BASE_PREDICTIONS, jsonl_text(result.predictions))
        out.json(paths.EVAL_BASE_INFO, result.info)
        out.measurement(paths.EVAL_BASE_COST, {"evaluate_base": result.cost})
        out.json(paths.EVAL_BASE_METRICS, {"base": result.quality})
    log.info("wrote %s, %s and %s", paths.EVAL_BASE_METRICS, paths.BASE_PREDICTIONS, paths.EVAL_BASE_INFO)


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
