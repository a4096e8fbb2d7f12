"""Rollout engines: one interface for sampling completions (vLLM colocated, vLLM server, transformers)."""
