"""The merge wing: the resolved job and the stages that run over it.

- :mod:`guardmerge.merge.job`: :class:`MergeJob`, a config resolved and validated once;
- :mod:`guardmerge.merge.layerwise`: the layer-wise stage (``lot``, ``regmean_pp``).

The stages run in this order: statistics, tensor merge (:mod:`guardmerge.merge.engine`), layer-wise
solves, head alignment, write (:mod:`guardmerge.merge.stages`).
"""
