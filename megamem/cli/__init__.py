"""Command-line interface: `megamem COMMAND ...` (see main.py)."""
