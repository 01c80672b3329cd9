# rnnserve service images: ONNX Runtime and FastAPI, no torch, non-root, the default model inside.
# Two variants of one build, chosen with the VARIANT build argument:
#   docker build -t rnnserve:0.1.0-gpu .                           onnxruntime-gpu and the CUDA 13 /
#                                                                  cuDNN 9 runtime wheels (default)
#   docker build --build-arg VARIANT=cpu -t rnnserve:0.1.0-cpu .   onnxruntime, no CUDA libraries
# Training and export have their own image: training.Dockerfile. Only the base image comes from a
# container registry, and the stages form one chain, so the classic builder builds nothing else.

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# -- build: a virtual environment with the pinned serving dependencies and the package -----------
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/requirements-serve.txt deploy/requirements-serve-cpu.txt deploy/requirements-serve-gpu.txt ./
RUN case "${VARIANT}" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu" >&2; exit 1;; esac \
    && pip install --no-cache-dir -r "requirements-serve-${VARIANT}.txt"
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
# onnx's backend test data (17 MB) is never used by the service; pip is not needed at run time.
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /opt/venv/lib/python*/site-packages/onnx/backend/test \
    && pip uninstall --yes pip

# -- service: the image ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
ARG VARIANT=gpu
LABEL org.opencontainers.image.title="rnnserve" \
      org.opencontainers.image.description="rnnserve service, ${VARIANT} variant" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=8000 \
    RNNSERVE_MODELS_DIR=/models
RUN useradd --create-home --uid 10001 rnnserve
COPY --from=build /opt/venv /opt/venv
# The default model; mount a folder on /models to serve others.
COPY models/co2-forecaster/1 /models/co2-forecaster/1
USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('RNNSERVE_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
