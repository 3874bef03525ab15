"""Environments: evaluation rollouts and dataset recording."""
