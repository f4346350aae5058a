"""The Typer command-line edge: parses, calls services, prints. No logic of its own."""
