"""Pipeline stages, each a function ``(config, upstream run IDs) -> run ID``.

Imported lazily by the CLI so that ``spatial_factorization --help`` stays fast.
"""

STAGES = ("preprocess", "train", "analyze", "figures")
