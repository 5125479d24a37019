"""Benchmarks of tripletloss_cuda (bench.py), their smoke tests, and the GPU machine check (gpu_check.sh)."""
