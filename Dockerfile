# Three images from one file (docs/architecture.md, "Images"):
#   operator  kopf + aiohttp + numpy + prometheus-client; no torch, no FAISS
#   runtime   the data plane: FAISS, numpy, pyarrow, boto3, the API server (adapters in numpy)
#   jobs      the runtime plus torch and the bundled encoders (runtime pods of models that
#             run from a bundled package: they encode upserts, queries and the backfill)
# torch must be the CPU build: give the CPU wheel index of your mirror at build time, e.g.
#   docker build --target jobs --build-arg TORCH_INDEX_URL=<CPU wheel index URL> -t driftless-jobs .
# or leave it empty when the build's pip configuration already resolves torch==2.13.0 to the
# CPU wheel (`make images` mounts the host's pip configuration at build time).
# Final stages run as uid 10001, hold no compilers and no pip caches.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin driftless

FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY index_runtime ./index_runtime
COPY index_operator ./index_operator

FROM source AS build-operator
# only what the control plane imports (a unit test checks the import closure; `make images`
# lists the image): kopf logs in by itself, so no Kubernetes client library (86 MB), and no
# pip or setuptools left in the final venv
RUN python -m venv /opt/venv \
 && pip install "kopf>=1.37,<2" "aiohttp>=3.9,<4" "pyyaml>=6,<7" "numpy>=1.26,<3" \
      "prometheus-client>=0.20,<1" \
 && pip install --no-deps /src \
 && pip uninstall -y -q pip setuptools

FROM source AS build-runtime
RUN python -m venv /opt/venv && pip install /src

FROM build-runtime AS build-jobs
ARG TORCH_INDEX_URL
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"; \
    else pip install "torch==2.13.0"; fi \
 && pip install "/src[embed]"

FROM base AS operator
COPY --from=build-operator /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8081 8082
ENTRYPOINT ["driftless", "operator"]

FROM base AS runtime
COPY --from=build-runtime /opt/venv /opt/venv
ENV OMP_NUM_THREADS=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["driftless"]
CMD ["serve", "--from-env", "--role", "reader", "--host", "0.0.0.0", "--maintenance", "off"]

FROM base AS jobs
COPY --from=build-jobs /opt/venv /opt/venv
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
USER 10001:10001
ENTRYPOINT ["driftless"]
CMD ["--help"]
