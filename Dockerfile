# Image for the relay worker, beat and the example app (see docker-compose.yml).
# The example page serves pusher-js from node_modules: fetch just that package in a node stage.
FROM node:20-slim AS assets
WORKDIR /assets
RUN npm install --no-audit --no-fund --omit=dev pusher-js@8.4.0

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY outbox ./outbox
COPY workers ./workers
COPY alembic ./alembic
COPY examples ./examples
COPY clients ./clients
COPY --from=assets /assets/node_modules/pusher-js ./node_modules/pusher-js
RUN pip install --no-cache-dir -e ".[example]"

RUN useradd --create-home --uid 10001 outbox
USER outbox

CMD ["celery", "-A", "workers", "worker", "--loglevel=INFO", "-Q", "outbox"]
