"""Metrics of held-out predictions, data baselines, model comparisons and scores against simulated truth.

May import: data, io, models and the floors below.
"""
