"""``python -m rankscope.cli`` runs the command line."""

from . import main

main()
