"""Model bundles on disk: the JSON manifest and the safetensors weights, read within size caps.

May import: models, errors, settings.
"""
