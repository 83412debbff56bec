"""The compilation stage (installed as neuronserve.compile): the two-tower model, tracing per target, parity check."""
