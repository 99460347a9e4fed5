"""Analysis of data and fitted factors: spatial autocorrelation and Poisson deviance.

Plain numpy/scipy, independent of MLflow and torch, so results can be checked anywhere.
"""

from sf_mlflow.analysis.deviance import poisson_deviance
from sf_mlflow.analysis.moran import knn_weights, morans_i

__all__ = ["knn_weights", "morans_i", "poisson_deviance"]
