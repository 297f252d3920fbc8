"""Models: the architecture adapters (:mod:`guardmerge.models.adapters`, all family knowledge)."""
