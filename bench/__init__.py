"""Benchmark scripts (run by hand, never in CI). See bench/RESULTS.md for how to run them."""
