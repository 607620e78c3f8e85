# Allegro Usage Sync: one image for the web server, the Celery worker and Celery beat.
# The command is chosen per service in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, read from pyproject.toml, so a code change does not reinstall them.
# (The code itself runs from /app rather than being installed as a package.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Only the application; a checkout's .venv, database and var/ stay out of the image.
COPY manage.py ./
COPY allegro ./allegro
COPY usage_sync ./usage_sync
COPY reprocess ./reprocess
# A wildcard, so the build also works while no template is committed yet (BuildKit).
COPY template[s] ./templates/

# Static files (admin, console) collected into var/static for a reverse proxy to serve.
RUN python manage.py collectstatic --noinput --verbosity 0

# Celery refuses to be comfortable as root, and nothing here needs root.
RUN useradd --system --uid 10001 --home-dir /app app \
    && mkdir -p /app/var \
    && chown -R app /app/var
USER app

EXPOSE 8000
CMD ["gunicorn", "allegro.wsgi:application", "--bind", "0.0.0.0:8000", "--access-logfile", "-"]
