"""Discrete-event simulation of one or many instances running the real scheduler objects."""

from fairbatch.sim.executor import SimExecutor
from fairbatch.sim.loop import SimOutcome, simulate

__all__ = ["SimExecutor", "SimOutcome", "simulate"]
