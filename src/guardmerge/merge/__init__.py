"""The merge wing: everything a merge does, from the resolved job to the written folder.

- :mod:`~guardmerge.merge.job`: :class:`MergeJob`, a config resolved and validated once, and the
  session that opens every checkpoint once (``with job.open():``);
- :mod:`~guardmerge.merge.plan`: compatibility checks and the merge plan;
- :mod:`~guardmerge.merge.stages`: the declared stages, in order: statistics
  (:mod:`~guardmerge.merge.statistics`), tensor merge (:mod:`~guardmerge.merge.engine`), layer-wise
  solves (:mod:`~guardmerge.merge.layerwise`: ``lot``, ``regmean_pp``, ``prodistill``), branch
  alignment (:mod:`~guardmerge.merge.branches`, for ``share_layers``), heal (:mod:`~guardmerge.merge.heal`:
  label-free distillation from the experts, the one stage that trains weights), head alignment
  (:mod:`~guardmerge.merge.align` with the closed-form fits in :mod:`~guardmerge.merge.fits`);
- :mod:`~guardmerge.merge.write`: the one output path (with :mod:`~guardmerge.merge.card`, the model
  card); :mod:`~guardmerge.merge.result`: :class:`MergeResult`; :mod:`~guardmerge.merge.allocator`.
"""
