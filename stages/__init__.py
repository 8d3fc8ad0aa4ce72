"""The pipeline's stages (`python -m stages.<name>`) and the pieces they share.

Shared pieces, one module each: params (params.yaml, validated), paths (every file the
pipeline reads or writes, matching dvc.yaml), prompt (chat building and tokenisation),
modeling (tokenizer and model loading, backend choice), rouge (Korean-aware ROUGE),
outputs (atomic writes), errors (user-facing failures).
"""
