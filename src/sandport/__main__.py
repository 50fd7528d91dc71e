"""``python -m sandport``."""

from sandport.cli import main

main()
