"""Stage 6 — evaluate: QPO prompts against baselines on held-out test queries, and the report."""
