"""``python -m nnsight_vla`` is the ``nnsight-vla`` command line."""

from .cli import main

main()
