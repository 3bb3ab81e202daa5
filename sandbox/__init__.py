"""Confines: one module per kernel mechanism; no policy logic."""
