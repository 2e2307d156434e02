"""Shared primitives of the merge methods, each a torch reference (the specification) that
fast backends are checked against."""
