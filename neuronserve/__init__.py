"""neuronserve: a serving runtime for a two-tower match scorer on AWS Inferentia NeuronCores.

Request path: service (gRPC) -> batcher -> pipeline -> backend (neuron | cpu | sim), and back.
"""

__version__ = "0.1.0"
