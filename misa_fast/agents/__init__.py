"""Agents: three learners, every algorithm a setting of one (``misa_fast.agents.algorithms``).

MISA, its variants, CQL, SAC-N and EDAC are the MISA learner (``misa_config.MISAConfig``); TD3+BC,
SPOT and ReBRAC the deterministic-actor learner (``td3_config.TD3Config``); BC, 10%BC, AWAC, OneStep
RL and IQL the weighted-regression learner (``weighted_config.WeightedConfig``)."""
from misa_fast.agents.misa import MISA, LossOutput, NonFiniteLossError, UpdateNoise
from misa_fast.agents.td3 import TD3, TD3Noise
from misa_fast.agents.weighted import Weighted, WeightedNoise

__all__ = ["MISA", "LossOutput", "NonFiniteLossError", "TD3", "TD3Noise", "UpdateNoise", "Weighted", "WeightedNoise"]
