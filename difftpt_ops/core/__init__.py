"""Specs, errors and states: the vocabulary every layer shares. Standard library only."""
