"""Every path the pipeline reads or writes, relative to the project root.

dvc.yaml names the same paths; tests/test_dvc_yaml.py checks that the two agree.
"""

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")

VALIDATED = Path("data/validated.txt")  # written by the validate stage, identical whenever params are valid
PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "validation", "test")


def split_file(split: str, prepared_dir: Path = PREPARED_DIR) -> Path:
    return prepared_dir / f"{split}.jsonl"


ADAPTER_DIR = Path("models/adapter")
# Checkpoints of an unfinished train run: outside dvc.yaml's outputs (git-ignored like models/),
# deleted once the run has written its outputs.
CHECKPOINT_DIR = Path("models/checkpoints")
MERGED_DIR = Path("models/merged")
# Where a stage notes the outputs it is replacing, until all are in place (stages/outputs.py):
# git-ignored like the rest of models/, and never a DVC output itself.
PUBLISH_JOURNALS = Path("models")
DVCLIVE_TRAIN_DIR = Path("dvclive/train")
TRAIN_CURVES = DVCLIVE_TRAIN_DIR / "plots/metrics"  # the output in dvc.yaml: DVCLive's .tsv files
# DVCLive writes there while train runs; train publishes the curves to TRAIN_CURVES with its other outputs.
CURVES_SCRATCH = CHECKPOINT_DIR / "dvclive"

METRICS_DIR = Path("metrics")
# Quality metrics (what a reviewer compares) in metrics/, the cost of producing them in
# metrics/cost/, counters, versions and other facts that are not compared in metrics/info/.
PREPARE_INFO = METRICS_DIR / "info/prepare.json"
TRAIN_METRICS = METRICS_DIR / "train.json"
TRAIN_COST = METRICS_DIR / "cost/train.json"
TRAIN_INFO = METRICS_DIR / "info/train.json"
EVAL_METRICS = METRICS_DIR / "eval.json"
EVAL_BASE_METRICS = METRICS_DIR / "eval_base.json"
PREDICTIONS = METRICS_DIR / "predictions.jsonl"
BASE_PREDICTIONS = METRICS_DIR / "predictions_base.jsonl"
REPORT = METRICS_DIR / "report.md"
# Speed and time (metrics a reviewer may compare, kept apart from quality), and counts and
# versions (plain outputs, not metrics).
EVAL_COST = METRICS_DIR / "cost/evaluate.json"
EVAL_BASE_COST = METRICS_DIR / "cost/evaluate_base.json"
EVAL_INFO = METRICS_DIR / "info/evaluate.json"
EVAL_BASE_INFO = METRICS_DIR / "info/evaluate_base.json"
# Per-question data behind dvc.yaml's top-level plots (decision confusion, ROUGE-L scatter).
DECISION_PLOT = METRICS_DIR / "eval_plots/decisions.json"
ROUGE_PLOT = METRICS_DIR / "eval_plots/rougeL.json"
PLOTS_DIR = METRICS_DIR / "plots"  # PNGs of every plot in dvc.yaml, viewable offline
