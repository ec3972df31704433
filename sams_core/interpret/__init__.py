"""What a trained model says: predicted effects, gene programs, gene sets, UMAP layouts, AnnData write-back.

May import: training, evaluation, data, io, models and the floors below.
"""
