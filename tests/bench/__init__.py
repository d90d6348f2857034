"""Benchmark harness and runner (bench/), checked on the CPU at tiny shapes."""
