"""Server-side aggregation: pure kernels and one Flower strategy per method."""

from strategies.aggregation import AggregationError, weighted_mean
from strategies.lora import LocalTrainSettings, LoraAggregate, LoraFedAvg
from strategies.sampling import SamplingError, sample_nodes

__all__ = [
    "AggregationError",
    "LocalTrainSettings",
    "LoraAggregate",
    "LoraFedAvg",
    "SamplingError",
    "sample_nodes",
    "weighted_mean",
]
