"""Checkpoint reading and writing. Knows nothing about merge methods."""
