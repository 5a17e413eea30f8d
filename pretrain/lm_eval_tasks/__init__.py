"""Tasks for EleutherAI's lm-evaluation-harness (`lm_eval --include_path pretrain/lm_eval_tasks`)."""
