# Outrigger admission webhook image.
#
#   docker build -t outrigger .
#   docker run --rm -p 8443:8443 -v "$PWD/certs:/etc/outrigger/tls:ro" outrigger
#
# Two stages: the builder makes a venv in /opt/venv from the pinned requirements.lock (binary
# wheels only) and then installs the project with --no-deps, its hot path compiled to C by
# mypyc (setup.py; the compiler and mypy stay in the builder); the runtime stage copies only
# that venv onto the same slim base, so the venv's python symlink (/usr/local/bin/python3.11)
# resolves there too.

FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The toolchain of the compiled hot path: a C compiler and the C library's headers
# (build-essential 12.9 is bookworm's, and pulls gcc and libc6-dev); Python's headers, which
# the python image has, from Debian where the base's Python is Debian's own (as in a Debian
# stand-in for the image); and mypyc with what it type-checks by, outside the venv (only the
# build sees them, through PYTHONPATH).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 \
    && if [ ! -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
        apt-get install -y --no-install-recommends 'python3.11-dev=3.11.*'; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir --only-binary=:all: --target /opt/build-tools \
        setuptools==84.2.1 mypy==2.4.1 types-PyYAML==6.0.12.20261122

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first: this layer is reused until requirements.lock changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir --only-binary=:all: -r requirements.lock

# The project itself; every dependency is already there from the lock. The check at the end
# fails the build if the hot path was not compiled.
COPY pyproject.toml setup.py README.md ./
COPY webhook ./webhook
RUN PYTHONPATH=/opt/build-tools OUTRIGGER_COMPILE=1 \
        pip install --no-cache-dir --no-deps --no-build-isolation . \
    && outrigger --help >/dev/null \
    && python -I -c "import webhook.core.injector as m; assert m.__file__.endswith('.so'), m.__file__"


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="outrigger" \
      org.opencontainers.image.description="Kubernetes mutating admission webhook that injects log-watcher sidecars, Envoy ambassadors and shared volumes" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# A fixed numeric uid/gid (10001, as the Helm chart's securityContext expects) so that
# runAsNonRoot can verify it. The default --cert-dir is made and owned by that user, so the
# server can generate a localhost certificate there when nothing is mounted; in Kubernetes
# the TLS Secret is mounted over it.
RUN groupadd --system --gid 10001 outrigger \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outrigger \
    && install -d -o 10001 -g 10001 -m 0750 /etc/outrigger/tls

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001

EXPOSE 8443

# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz itself (see the chart),
# and the slim image has no HTTPS client to probe the self-signed TLS endpoint with.
ENTRYPOINT ["outrigger", "serve"]
# Overriding the arguments replaces this default, so pass --cert-dir again with them.
CMD ["--cert-dir", "/etc/outrigger/tls"]
