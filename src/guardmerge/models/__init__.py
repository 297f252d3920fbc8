"""Models: the architecture adapters (:mod:`guardmerge.models.adapters`, all family knowledge) and
the merged multi-head artifact (:mod:`guardmerge.models.multihead`)."""
