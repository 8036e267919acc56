"""Prefect flows that chain the stages, the ``quantpipe`` CLI and deployment definitions."""
