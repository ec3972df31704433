"""Model families (one file each), their shared network pieces, probability distributions and the
family registry (:mod:`sams_core.models.registry`: name, label, options, capabilities).

This wing is the floor the others stand on: it imports only :mod:`sams_core.errors`. Importing
the package itself loads nothing heavy; PyTorch loads with the first model module used.
"""
