"""``python -m ionflow.cli``: the same as the ``ionflow`` command."""

from ionflow.cli import main

main()
