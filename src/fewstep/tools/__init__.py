"""Command-line helpers: python -m fewstep.tools.<name>."""
