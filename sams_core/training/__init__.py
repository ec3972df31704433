"""A model built for a screen (``build.py``), the training loop over a step, multi-process
training, and sVAE+'s fit of new conditions.

May import: evaluation, data, io, models and the floors below.
"""
