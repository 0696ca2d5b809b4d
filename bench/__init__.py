"""Benchmarks and baselines behind the README's tables (may import anything; nothing imports it)."""
