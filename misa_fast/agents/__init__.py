"""Agents. MISA and its variants are one learner configured by ``misa_fast.agents.misa_config.MISAConfig``;
TD3+BC and SPOT are one deterministic-actor learner configured by ``misa_fast.agents.td3_config.TD3Config``."""
from misa_fast.agents.misa import MISA, LossOutput, NonFiniteLossError, UpdateNoise
from misa_fast.agents.td3 import TD3, TD3Noise

__all__ = ["MISA", "LossOutput", "NonFiniteLossError", "TD3", "TD3Noise", "UpdateNoise"]
