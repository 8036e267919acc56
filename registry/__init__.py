"""MLflow tracking and model registry for quantpipe.

This package is the only place that imports :mod:`mlflow`, so the rest of the pipeline depends on a small,
typed surface (``registry.tracking`` for runs, ``registry.models`` for versions and aliases) instead of on
MLflow's global state and version-specific quirks. Nothing is imported here: ``import registry`` stays cheap
and MLflow (about a second to import) is only loaded by the modules that need it.
"""
