"""Offline active-learning benchmark: built-in two-view datasets and their tooling."""
