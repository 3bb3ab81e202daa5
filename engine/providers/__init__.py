"""Providers: each declared provider runs as a child process of the engine (DESIGN.md §4)."""
