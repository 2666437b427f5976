# Base images built from Debian's packages, for machines that reach no container registry (see
# deploy/local-base.sh, which builds FROM the minimal Debian root filesystem that debootstrap made and
# `docker import`ed). They stand in for python:3.11-slim-bookworm and redis:7.2.5-bookworm.
ARG ROOTFS=embeddings-local/debian:bookworm

# ---- python: Debian's Python 3.11 with venv and pip, `python` on the PATH, this machine's CA bundle ----
FROM ${ROOTFS} AS python
# The CA bundle of the machine that builds: pip inside later builds reaches the same package index as
# this machine only with it (an intercepting proxy's CA, a company CA).
COPY ca-certificates.crt /tmp/host-ca-certificates.crt
# hadolint ignore=DL3008
RUN printf '%s\n' \
      'deb http://deb.debian.org/debian bookworm main' \
      'deb http://deb.debian.org/debian bookworm-updates main' \
      'deb http://deb.debian.org/debian-security bookworm-security main' > /etc/apt/sources.list \
 && apt-get update \
 && apt-get upgrade -y --no-install-recommends \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3-pip python-is-python3 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/* \
 && cp /tmp/host-ca-certificates.crt /etc/ssl/certs/ca-certificates.crt \
 && rm /tmp/host-ca-certificates.crt \
 && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
ENV LANG=C.UTF-8 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]

# ---- redis: Debian's redis-server (7.0), run as uid 999 in /data like the official image ----
FROM ${ROOTFS} AS redis
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid 999 --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
 && printf '%s\n' \
      'deb http://deb.debian.org/debian bookworm main' \
      'deb http://deb.debian.org/debian bookworm-updates main' \
      'deb http://deb.debian.org/debian-security bookworm-security main' > /etc/apt/sources.list \
 && apt-get update \
 && apt-get upgrade -y --no-install-recommends \
 && apt-get install -y --no-install-recommends redis-server \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/* \
 && mkdir -p /data \
 && chown 999:999 /data
ENV LANG=C.UTF-8
VOLUME ["/data"]
WORKDIR /data
USER 999:999
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
