"""Agents. MISA and its variants are one learner configured by ``misa_fast.config.MISAConfig``."""
from misa_fast.agents.misa import MISA, LossOutput, NonFiniteLossError, UpdateNoise

__all__ = ["MISA", "LossOutput", "NonFiniteLossError", "UpdateNoise"]
