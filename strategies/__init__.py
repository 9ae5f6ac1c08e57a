"""Server-side aggregation: pure kernels and one strategy per method.

Importing this package is cheap: each name is imported from its module on
first use.
"""

from __future__ import annotations

from protocols.lazy import lazy_exports

__all__ = [
    "Aggregate",
    "AggregationError",
    "FedAvgRound",
    "FedKSeed",
    "LabelledReply",
    "LocalTrainSettings",
    "LoraAggregate",
    "LoraFedAvg",
    "NodeBook",
    "Nodes",
    "ProStatistics",
    "SFPromptFedAvg",
    "SamplingError",
    "SeedUpdate",
    "SplitAggregate",
    "SplitRoundSettings",
    "Strategy",
    "TensorFedAvg",
    "ZoAggregate",
    "ZoGlobal",
    "aggregate_seed_scalars",
    "sample_nodes",
    "triage",
    "weighted_loss",
    "weighted_mean",
]

_LAZY = {
    "Aggregate": "strategies.strategy",
    "AggregationError": "strategies.aggregation",
    "FedAvgRound": "strategies.fedavg",
    "FedKSeed": "strategies.fedkseed",
    "LabelledReply": "strategies.strategy",
    "LocalTrainSettings": "strategies.lora",
    "LoraAggregate": "strategies.lora",
    "LoraFedAvg": "strategies.lora",
    "NodeBook": "strategies.sampling",
    "Nodes": "strategies.strategy",
    "ProStatistics": "strategies.seed_pool",
    "SFPromptFedAvg": "strategies.sfprompt",
    "SamplingError": "strategies.sampling",
    "SeedUpdate": "strategies.seed_pool",
    "SplitAggregate": "strategies.sfprompt",
    "SplitRoundSettings": "strategies.sfprompt",
    "Strategy": "strategies.strategy",
    "TensorFedAvg": "strategies.fedavg",
    "ZoAggregate": "strategies.fedkseed",
    "ZoGlobal": "strategies.fedkseed",
    "aggregate_seed_scalars": "strategies.seed_pool",
    "sample_nodes": "strategies.sampling",
    "triage": "strategies.replies",
    "weighted_loss": "strategies.replies",
    "weighted_mean": "strategies.aggregation",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
