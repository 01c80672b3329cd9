# rnnserve training image: torch (CPU wheels) and the training package, to train and export models.
#   docker build -f training.Dockerfile -t rnnserve-train:0.1.0 .
#   docker run --rm -v "$PWD/runs:/work/runs" -v "$PWD/models:/work/models" rnnserve-train:0.1.0 \
#       train --task co2 --out runs/co2-gru
# The service images (Dockerfile) never build this: it has a file of its own.

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE}
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
RUN pip install --no-cache-dir --no-deps . \
    && chown -R 10001:10001 /work
USER 10001
ENTRYPOINT ["python", "-m", "training"]
