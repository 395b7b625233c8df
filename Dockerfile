# One image for every AIPROD service; each Kubernetes Deployment picks its module
# (`python -m aiprod_gateway`, `python -m aiprod_renderers.veo`, ...). Build from the repository root:
#   docker build -t aiprod:dev .
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/aiprod
ENV PATH=/opt/aiprod/bin:$PATH
WORKDIR /src
# The locked dependencies first, in their own layer: code changes do not reinstall them.
COPY requirements.lock ./
RUN pip install -r requirements.lock
# Then the generated stubs and the mesh itself, as the Makefile installs them (but not editable: the
# runtime stage keeps only the virtualenv, not the sources).
COPY pyproject.toml ./
COPY libs libs
COPY services services
RUN pip install --no-deps ./libs/protos .

FROM python:3.11-slim
RUN groupadd --gid 10001 aiprod \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin aiprod \
    && mkdir -p /var/lib/aiprod \
    && chown 10001:10001 /var/lib/aiprod
COPY --from=build /opt/aiprod /opt/aiprod
# HOME=/tmp: the root filesystem is read-only in Kubernetes; /tmp and the data directory are volumes.
ENV PATH=/opt/aiprod/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    AIPROD_HOST=0.0.0.0 \
    AIPROD_DATA_DIR=/var/lib/aiprod
WORKDIR /var/lib/aiprod
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
CMD ["aiprod", "--help"]
