"""Compute: the instance manager (the only writer of instance state)."""
