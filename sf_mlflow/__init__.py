"""sf_mlflow: spatial factor models for spatial transcriptomics, tracked in MLflow.

Importing the package turns on flushing of float32 denormals in torch. Matern
kernel values between distant spots underflow into denormals, which are very
slow on CPUs; flushing them to zero changes no ELBO digit that matters but
makes an SVGP step several times faster. It must happen at import, before
torch starts its intra-op worker threads, or only the main thread benefits.
"""

import torch as _torch

_torch.set_flush_denormal(True)

__version__ = "0.1.0"

from sf_mlflow.errors import (  # noqa: E402
    ConfigError,
    DataError,
    ModelError,
    RunLookupError,
    SfMlflowError,
)


def __getattr__(name: str):
    # to_anndata reaches MLflow; import it on first use so `import sf_mlflow` stays light
    if name == "to_anndata":
        from sf_mlflow.export import to_anndata

        return to_anndata
    raise AttributeError(f"module 'sf_mlflow' has no attribute {name!r}")


__all__ = [
    "__version__",
    "to_anndata",
    "ConfigError",
    "DataError",
    "ModelError",
    "RunLookupError",
    "SfMlflowError",
]
