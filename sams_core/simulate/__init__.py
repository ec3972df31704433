"""Simulated screens with their answer keys (masks, effects, latents, gene programs).

May import: errors, settings.
"""

from __future__ import annotations

from sams_core.simulate.screens import (
    PERTURBATION_SYMBOLS,
    SimulationTruth,
    combination_shift,
    perturbation_names,
    simulate_main,
    simulate_sams_screen,
    simulate_svae_screen,
    true_proportions,
    truth_from_adata,
    truth_masks_for,
)

__all__ = ["PERTURBATION_SYMBOLS", "SimulationTruth", "perturbation_names", "simulate_sams_screen", "simulate_svae_screen", "truth_from_adata", "combination_shift", "truth_masks_for", "true_proportions", "simulate_main"]
