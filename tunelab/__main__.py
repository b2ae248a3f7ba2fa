"""`python -m tunelab` runs the CLI."""

from tunelab.cli import entry

entry()
