"""``tinydrift device``, ``fleet-sim`` and ``demo`` (filled in with the edge agent)."""
