"""Pipeline stages, each a function ``(config, upstream run IDs) -> run ID``.

:mod:`sf_mlflow.stages.table` lists them (:data:`~sf_mlflow.stages.table.STAGES`); the
CLI imports a stage module only to run it, so ``spatial_factorization --help`` stays fast.
"""
