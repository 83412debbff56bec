# neuronserve images. No Docker engine runs on our CI machines: CI lints this file (hadolint) and checks
# its contract (tests/test_deploy.py), and tests/test_packaging.py runs the same install steps (a wheel
# built by setup.py's hook, installed non-editable, served from a read-only copy by a non-root user).
#   docker build --target cpu  -t neuronserve:cpu .
#   docker build --target inf1 -t neuronserve:inf1 .
# Both run as user 10001 and work with a read-only root filesystem: the writable paths are /tmp and
# $NEURONSERVE_CACHE_DIR (mount them as volumes: deploy/ does). Health: `neuronserve health`
# (grpc.health.v1 Check on 127.0.0.1:$NEURONSERVE_PORT).

# The wheel, with the protobuf/gRPC modules generated at build time (grpcio-tools only in this stage) and
# the tick's C kernels compiled (gcc only in this stage; without it the wheel falls back to numpy).
FROM python:3.10-slim AS wheel
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY neuronserve ./neuronserve
COPY csrc ./csrc
COPY compile ./compile
COPY bench ./bench
RUN pip wheel --no-cache-dir --no-deps -w /dist .

# CPU image: the whole stack on the CPU or the simulated NeuronCores, the demo artifact baked in.
FROM python:3.10-slim AS cpu
ENV NEURONSERVE_HOST=0.0.0.0 \
    NEURONSERVE_PORT=8001 \
    NEURONSERVE_METRICS_PORT=8002 \
    NEURONSERVE_ARTIFACT=/opt/neuronserve/artifact \
    NEURONSERVE_CACHE_DIR=/var/cache/neuronserve \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=wheel /dist /dist
# the CPU build of torch from PyTorch's CPU index: PyPI's Linux wheel pulls gigabytes of CUDA packages
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir /dist/neuronserve-*.whl \
    && rm -rf /dist \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin neuronserve \
    && install -d -o 10001 -g 10001 /var/cache/neuronserve \
    && neuronserve compile --out /opt/neuronserve/artifact --target cpu --quiet
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["neuronserve", "health"]
ENTRYPOINT ["neuronserve"]
CMD ["serve"]

# Inf1 image: AWS's last torch-neuron image (torch 1.13.1, Python 3.10, Neuron SDK 2.20.2), which
# already carries torch-neuron, the Neuron runtime and its pins (protobuf 3.19.5, numpy < 1.24): the
# inf1 extra keeps pip on them. The artifact (`neuronserve compile --target neuron`) is mounted at
# /artifact, or baked in by a derived image (COPY --chown=10001 ... /artifact).
FROM public.ecr.aws/neuron/pytorch-inference-neuron:1.13.1-neuron-py310-sdk2.20.2-ubuntu20.04 AS inf1
ENV NEURONSERVE_HOST=0.0.0.0 \
    NEURONSERVE_PORT=8001 \
    NEURONSERVE_METRICS_PORT=8002 \
    NEURONSERVE_BACKEND=neuron \
    NEURONSERVE_ARTIFACT=/artifact \
    NEURONSERVE_CACHE_DIR=/var/cache/neuronserve \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=wheel /dist /dist
# DL3013: a local wheel whose extra pins the image's own versions
# hadolint ignore=DL3013
RUN WHEEL="$(ls /dist/neuronserve-*.whl)" \
    && pip install --no-cache-dir "${WHEEL}[inf1]" \
    && rm -rf /dist \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin neuronserve \
    && install -d -o 10001 -g 10001 /var/cache/neuronserve
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 CMD ["neuronserve", "health"]
ENTRYPOINT ["neuronserve"]
CMD ["serve"]
