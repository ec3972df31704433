"""What a trained model says, for people reading a screen through it.

- :mod:`~sams_core.interpret.effects`: predicted effects of any combination (with dosages and
  intervals) set beside the data, the unmeasured pairs worth measuring next, perturbation distances;
- :mod:`~sams_core.interpret.dose`: one perturbation's predicted effect over a range of dosages;
- :mod:`~sams_core.interpret.programs`: each latent unit's gene loadings, top genes and gene-set
  enrichment;
- :mod:`~sams_core.interpret.genesets`: GMT gene-set collections and the enrichment tests;
- :mod:`~sams_core.interpret.embed`: UMAP layouts of cells' latents, cached on disk;
- :mod:`~sams_core.interpret.writeback`: the results written into the screen's AnnData.

May import: training, evaluation, data, io, models and the floors below.
"""
