"""Benchmarks (`make bench`): results are written to experiments/bench/*.md, never asserted by tests."""
