"""Decides: policy, pipeline, WAL, providers, server, proxy, client."""
