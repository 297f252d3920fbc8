"""The fast paths behind the sparsify-and-consensus methods and PCB.

:mod:`guardmerge.methods.reference` states each method on whole tensors, as the papers do; the
modules here compute the same results without holding more than a few column chunks of a tensor,
and without materialising a whole model for the global top-k:

- :mod:`.selection`: exact order statistics (k-th smallest, exactly-k cuts), in memory or
  streamed over a whole model, chunk by chunk;
- :mod:`.sparsify`: magnitude trim, DARE drop and breadcrumbs window over column chunks;
- :mod:`.consensus`: TIES sign election and disjoint mean / sum over column chunks;
- :mod:`.kernels`: optional one-pass numba kernels for the hottest loops (bit-identical to the
  chunked torch code), with :mod:`.fused` the compiled loops themselves. Without numba, or with
  ``GUARDMERGE_KERNELS=torch``, the chunked torch code runs.

``tests/methods`` checks the chunked and the fused paths against the reference.
"""
