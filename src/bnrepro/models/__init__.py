"""Networks of the paper."""
