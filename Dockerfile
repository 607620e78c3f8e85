# Allegro Usage Sync: one image for the web server, the Celery worker and Celery beat.
# The command is chosen per service in docker-compose.yml. Build argument EXTRAS names
# optional dependency groups of pyproject.toml to add (docker-compose's flower service
# builds with EXTRAS=flower; the other services do without it).
FROM python:3.11-slim

ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, read from pyproject.toml, so a code change does not reinstall them.
# (The code itself runs from /app rather than being installed as a package.)
COPY pyproject.toml ./
RUN EXTRAS="$EXTRAS" python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in os.environ['EXTRAS'].split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Only the application; a checkout's .venv, database and var/ stay out of the image.
COPY manage.py ./
COPY allegro ./allegro
COPY usage_sync ./usage_sync
COPY reprocess ./reprocess
COPY templates ./templates

# Static files (admin, console, API docs) collected into var/static, compressed and with
# content-hashed names, for the application to serve (WhiteNoise).
RUN python manage.py collectstatic --noinput --verbosity 0

# Celery refuses to be comfortable as root, and nothing here needs root. The metrics
# directory is a volume in docker-compose.yml; it exists in the image for `docker run`.
RUN useradd --system --uid 10001 --home-dir /app app \
    && mkdir -p /app/var /run/allegro-metrics \
    && chown -R app /app/var /run/allegro-metrics
USER app

EXPOSE 8000
CMD ["gunicorn", "--config=python:allegro.gunicorn_conf", "allegro.wsgi:application", "--bind=0.0.0.0:8000"]
