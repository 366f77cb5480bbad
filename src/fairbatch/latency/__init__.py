"""Step-time models: ``LinearLatencyModel`` (fitted) and ``RooflineLatencyModel`` (analytic)."""

from fairbatch.latency.base import LatencyModel
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.latency.profiles import latency_model_from_dict, load_latency_model, load_profile
from fairbatch.latency.roofline import RooflineLatencyModel

__all__ = ["LatencyModel", "LinearLatencyModel", "RooflineLatencyModel", "latency_model_from_dict",
           "load_latency_model", "load_profile"]
