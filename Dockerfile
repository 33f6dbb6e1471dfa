# Image of the k3s-deploy-action container action.
#
# The base is the official slim Python image. Releases pin it by digest
# (ARG BASE_IMAGE=python:3.12-slim@sha256:...), so a published tag always builds the same image.
# Where no registry can be reached, CI builds on a local stand-in made by .ci/base-image.sh:
#   docker build --network host --build-arg BASE_IMAGE="$(bash .ci/base-image.sh)" .
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Runtime dependencies go into their own venv: the same on the official image and on Debian's
# python (whose system pip stays untouched). Wheels only, every file checked against the hashes
# in the lock (see requirements.in to regenerate it), so nothing is compiled and no build tool
# is needed; the venv's own pip is removed once it is done.
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --require-hashes --no-deps \
        --only-binary=:all: -r /tmp/requirements.lock \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && rm /tmp/requirements.lock

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

COPY deploykit /app/deploykit
COPY entrypoint.py /app/
# The post-entrypoint (action.yml runs.post-entrypoint): executable, its shebang names the venv's python.
COPY post.py /app/

# Exec form: the action's Python is PID 1 and receives the runner's SIGINT/SIGTERM itself.
# No USER: GitHub runs container actions as the image's default user (root), which owns the
# mounted workspace and file-command files.
ENTRYPOINT ["python", "/app/entrypoint.py"]
