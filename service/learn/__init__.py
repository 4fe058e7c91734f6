"""Building candidate models with river: factory training, export of river linear models."""
