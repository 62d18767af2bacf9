"""Analyses of stored runs (one module per experiment family). Imports the store, never Ray."""
