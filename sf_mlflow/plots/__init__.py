"""Figures of fitted spatial factor models, built from plain arrays.

Every function returns a :class:`matplotlib.figure.Figure` made without pyplot (an Agg
canvas attached directly), so importing or calling these never changes the matplotlib
backend of a notebook and leaves no figure open; pass ``path=`` to save as well, or call
``fig.savefig(path)``. Tissue maps are rasterised scatter plots with marker sizes derived
from the spot density and panel size, so 300 and 41,786 spots both look filled.

Conventions shared by every map: y grows downwards, as ``squidpy.pl.spatial_scatter``
draws it (``invert_y=False`` flips it); ``heldout=`` (N,) bool draws those spots as hollow
rings, explained in a legend; colour bars are labelled with the quantity; grids wrap at
four panels a row. Both gene figures rank genes by one criterion, loading x share
(:data:`sf_mlflow.analysis.enrichment.TOP_GENE_CRITERION`), named in their titles.

* :mod:`~sf_mlflow.plots.spatial`: ``factors_spatial``, ``scales_spatial``,
  ``groupwise_factors``, ``spatial_grid``;
* :mod:`~sf_mlflow.plots.training`: ``elbo_curve``;
* :mod:`~sf_mlflow.plots.genes`: ``top_genes``, ``factors_with_genes``,
  ``gene_enrichment_heatmap``, ``enrichment_for_group``;
* :mod:`~sf_mlflow.plots.compare`: ``compare_morans_i``, ``compare_factor_maps`` (factors
  paired across models by Hungarian matching on correlation, r in each title).
* :mod:`~sf_mlflow.plots.cell_types`: ``cell_types`` (where each cell type is).
"""

from sf_mlflow.plots.cell_types import cell_types
from sf_mlflow.plots.compare import compare_factor_maps, compare_morans_i
from sf_mlflow.plots.genes import (enrichment_for_group, factors_with_genes,
                                   gene_enrichment_heatmap, top_genes)
from sf_mlflow.plots.spatial import (factors_spatial, groupwise_factors, scales_spatial,
                                     spatial_grid)
from sf_mlflow.plots.training import elbo_curve

__all__ = ["cell_types", "compare_factor_maps", "compare_morans_i", "elbo_curve", "enrichment_for_group",
           "factors_spatial", "factors_with_genes", "gene_enrichment_heatmap",
           "groupwise_factors", "scales_spatial", "spatial_grid", "top_genes"]
