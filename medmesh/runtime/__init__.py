"""Shared runtime of every medmesh service: written once, imported everywhere."""
