"""Watching it run: push and apply reports, in-process metrics, server checks, the eviction watch."""
