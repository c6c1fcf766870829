# One image for every role of the `taskscheduler` CLI (api, scheduler, worker, migrate); docker-compose.yml
# picks the role with `command`. Build: docker build -t taskscheduler:local .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app

WORKDIR /src

# Dependencies first, read from pyproject.toml, so that a change to the code alone reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (.dockerignore lets in only pyproject.toml, README.md and src/).
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src/build

WORKDIR /app
USER 10001:10001

# A container is reached through its interfaces, not its loopback: listen on all of them (the settings'
# defaults are 127.0.0.1). Set API_KEYS too, or every role warns at start-up that it is open.
ENV API_HOST=0.0.0.0 \
    METRICS_HOST=0.0.0.0

EXPOSE 8000
CMD ["taskscheduler", "api"]
