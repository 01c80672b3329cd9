# syntax=docker/dockerfile:1
# rnnserve images. Targets:
#   service  (default)  the ONNX Runtime service: no torch, non-root, the default model inside
#   training            torch (CPU wheels) + the training package, to train and export models
# Build: docker build -t rnnserve:0.1.0 .    Training: docker build --target training -t rnnserve-train .

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# -- build: a virtual environment with the pinned serving dependencies and the package -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/requirements-serve.txt ./
RUN pip install --no-cache-dir -r requirements-serve.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN pip install --no-cache-dir --no-deps .

# -- training: torch on CPU wheels plus the training extra ----------------------------------------
FROM ${PYTHON_IMAGE} AS training
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 rnnserve
WORKDIR /work
COPY deploy/requirements-train.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==2.13.0" \
    && pip install --no-cache-dir -r requirements-train.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN pip install --no-cache-dir --no-deps .
USER 10001
ENTRYPOINT ["python", "-m", "training"]

# -- service: the default target ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
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
