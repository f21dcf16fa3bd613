"""Examples (runnable as scripts); benchmarks import their models from here."""
