"""Evaluation: benchmark loading (BENCHMARKS.md layout), metrics, forgetting, latency, the report."""
