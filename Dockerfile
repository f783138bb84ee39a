# Image for the relay worker, beat and the example app (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY outbox ./outbox
COPY workers ./workers
COPY alembic ./alembic
COPY examples ./examples
RUN pip install --no-cache-dir -e ".[example]"

RUN useradd --create-home --uid 10001 outbox
USER outbox

CMD ["celery", "-A", "workers", "worker", "--loglevel=INFO", "-Q", "outbox"]
