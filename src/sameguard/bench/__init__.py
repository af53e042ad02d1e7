"""Experiments: metrics now; the attack benchmark runner and reports build on them."""
