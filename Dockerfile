# neuronserve images. Not built on our CI machines (no Docker engine there); kept small and plain.
#   docker build --target cpu -t neuronserve:cpu .
#   docker build --target inf1 -t neuronserve:inf1 .
# Run the Inf1 image with the Neuron device plugin's resources (aws.amazon.com/neuroncore) and an
# artifact compiled with `neuronserve compile --target neuron` mounted at /artifact.

# CPU image: the whole stack on the CPU or the simulated NeuronCores.
FROM python:3.10-slim AS cpu
WORKDIR /opt/neuronserve
COPY pyproject.toml README.md ./
COPY neuronserve ./neuronserve
COPY compile ./compile
COPY bench ./bench
# the CPU build of torch from PyTorch's CPU index: PyPI's Linux wheel pulls gigabytes of CUDA packages
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install --no-cache-dir .
EXPOSE 8001 8002
ENTRYPOINT ["neuronserve"]
CMD ["serve", "--host", "0.0.0.0"]

# Inf1 image: AWS's last torch-neuron image (torch 1.13.1, Python 3.10, Neuron SDK 2.20.2),
# which already carries torch-neuron and the Neuron runtime.
FROM public.ecr.aws/neuron/pytorch-inference-neuron:1.13.1-neuron-py310-sdk2.20.2-ubuntu20.04 AS inf1
WORKDIR /opt/neuronserve
COPY pyproject.toml README.md ./
COPY neuronserve ./neuronserve
COPY compile ./compile
COPY bench ./bench
RUN pip install --no-cache-dir .
EXPOSE 8001 8002
ENTRYPOINT ["neuronserve"]
CMD ["serve", "--host", "0.0.0.0", "--backend", "neuron", "--artifact", "/artifact"]
