"""Data: sources (slideseq, h5ad, synthetic), preprocessing, and artifact I/O."""

from sf_mlflow.data.counts import SpatialCounts

__all__ = ["SpatialCounts"]
