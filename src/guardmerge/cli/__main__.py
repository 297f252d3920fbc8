"""``python -m guardmerge.cli``."""

from guardmerge.cli import main

main()
