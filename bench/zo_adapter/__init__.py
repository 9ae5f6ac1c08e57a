"""``python -m bench.zo_adapter``: FedKSeed over a LoRA adapter, tuned until held-out Rouge-L rises."""
