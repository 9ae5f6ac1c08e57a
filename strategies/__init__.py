"""Server-side aggregation: pure kernels and one Flower strategy per method."""

from strategies.aggregation import AggregationError, weighted_mean
from strategies.fedkseed import FedKSeed, ZoAggregate
from strategies.lora import LocalTrainSettings, LoraAggregate, LoraFedAvg
from strategies.replies import CentrallyEvaluated, NodeBook, triage
from strategies.sampling import SamplingError, sample_nodes
from strategies.seed_pool import ProStatistics, SeedUpdate, aggregate_seed_scalars
from strategies.sfprompt import SFPromptFedAvg, SplitAggregate, SplitRoundSettings

__all__ = [
    "AggregationError",
    "CentrallyEvaluated",
    "FedKSeed",
    "LocalTrainSettings",
    "LoraAggregate",
    "LoraFedAvg",
    "NodeBook",
    "ProStatistics",
    "SFPromptFedAvg",
    "SamplingError",
    "SeedUpdate",
    "SplitAggregate",
    "SplitRoundSettings",
    "ZoAggregate",
    "aggregate_seed_scalars",
    "sample_nodes",
    "triage",
    "weighted_mean",
]
