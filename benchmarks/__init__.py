"""Benchmarks: throughput, MFU, compile time, memory, input pipeline."""
