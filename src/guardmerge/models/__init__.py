"""Models: the architecture adapters (:mod:`guardmerge.models.adapters`, all family knowledge), the
head-kind table (:mod:`guardmerge.models.head_kinds`, all head-kind knowledge) and the merged
multi-head artifact (:mod:`guardmerge.models.multihead`, built from :mod:`~guardmerge.models.heads`,
:mod:`~guardmerge.models.branches` and :mod:`~guardmerge.models.modules`; folders in
:mod:`~guardmerge.models.folder`, stock export in :mod:`~guardmerge.models.stock_export`)."""
