FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY idemtasks ./idemtasks
COPY worker ./worker
RUN pip install --no-cache-dir ".[service]"
USER nobody
