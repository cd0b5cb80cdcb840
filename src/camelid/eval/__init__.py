"""Evaluation on camelid's own engine: perplexity, an lm-evaluation-harness backend, answers and a judge
(MT-bench style), and the arena's Bradley-Terry ratings. Library code only: `commands/eval.py` is the CLI."""
