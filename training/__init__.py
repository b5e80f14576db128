"""Offline training of the paper's three stages, evaluation and export."""
