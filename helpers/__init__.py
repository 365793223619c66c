"""Shared, tested helpers for the genimg-notebooks collection."""
