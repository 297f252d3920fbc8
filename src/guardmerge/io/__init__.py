"""The I/O wing: everything that touches files, and nothing that knows a model family.

- :mod:`guardmerge.io.formats`: file names, ``config.json`` checks, the one weight-file finder;
- :mod:`guardmerge.io.safetensors`: one safetensors file, its header checked;
- :mod:`guardmerge.io.checkpoint`: the one checked reader of a model folder (stored names);
- :mod:`guardmerge.io.writer`: streaming safetensors output in size-capped shards;
- :mod:`guardmerge.io.finite`: the one NaN/Inf check of every tensor read, written or loaded;
- :mod:`guardmerge.io.atomic`: output paths checked once, written in a temporary sibling and
  renamed into place;
- :mod:`guardmerge.io.hub`: a merged folder checked and pushed to the Hugging Face Hub.
"""

from __future__ import annotations

from guardmerge.io.atomic import atomic_dir, atomic_file, check_output, clean_stale_temps
from guardmerge.io.formats import read_json

__all__ = ["atomic_dir", "atomic_file", "check_output", "clean_stale_temps", "read_json"]
