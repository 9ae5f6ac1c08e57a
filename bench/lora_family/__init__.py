"""Federated LoRA as the field does it: aggregation rules, mixed ranks, server optimizers (``python -m bench.lora_family``)."""
