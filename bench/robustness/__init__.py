"""``python -m bench.robustness``: defences against hostile clients, DP utility, SecAgg cost."""
