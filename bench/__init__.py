"""The benchmark (installed as neuronserve.bench): an open-loop gRPC load generator and its reports."""
