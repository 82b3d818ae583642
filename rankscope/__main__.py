"""``python -m rankscope`` runs the command line."""

from .cli import main

main()
