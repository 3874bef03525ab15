"""Sweeps on Ray Tune and the reports of run directories."""
