"""Whole models, one per file."""
