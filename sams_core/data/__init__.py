"""The data contract: reading and validating screens, labels, splits, summaries and device batches.

May import: models, io (below it), labels, errors, settings.
"""
