"""Real, small parts for tests and benchmarks: tiny generated models and a fake backend program."""
