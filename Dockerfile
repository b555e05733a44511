# smtpd-agent image: the server (`serve`, the default) or a worker (`worker`).
# Build: docker build -t smtpd-agent .   Local stack: docker compose up (docker-compose.yml).
# Configuration comes from the environment (SMTPD_AGENT_SECTION_KEY, DATABASE_URL, ...)
# over the documented defaults in /etc/smtpd-agent/smtpd-agent.toml.

# --- build: a virtualenv with the project and its runtime dependencies only -------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/smtpd-agent/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/runtime.lock ./requirements/
COPY smtpd_agent ./smtpd_agent
# The locked runtime dependencies (the versions and files the suite ran with, checked by
# hash), then the project without resolving again; no test dependencies or tests.
RUN /opt/smtpd-agent/venv/bin/pip install --require-hashes --no-deps -r requirements/runtime.lock \
 && /opt/smtpd-agent/venv/bin/pip install --no-deps . \
 && /opt/smtpd-agent/venv/bin/pip check \
 && /opt/smtpd-agent/venv/bin/pip uninstall -y pip setuptools wheel

# --- runtime: the virtualenv, the default config, an unprivileged user ------------------
FROM python:3.11-slim-bookworm
RUN useradd --system --user-group --uid 10025 --home-dir /var/lib/smtpd-agent \
        --shell /usr/sbin/nologin smtpd-agent \
 && install -d -o smtpd-agent -g smtpd-agent -m 0750 /var/lib/smtpd-agent
COPY --from=build /opt/smtpd-agent/venv /opt/smtpd-agent/venv
COPY config/smtpd-agent.toml /etc/smtpd-agent/smtpd-agent.toml
ENV PATH=/opt/smtpd-agent/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SMTPD_AGENT_CONFIG=/etc/smtpd-agent/smtpd-agent.toml \
    SMTPD_AGENT_SERVER_STATE_DIR=/var/lib/smtpd-agent \
    SMTPD_AGENT_SMTP_HOST=0.0.0.0 \
    SMTPD_AGENT_SMTP_PORT=25 \
    SMTPD_AGENT_HTTP_HOST=0.0.0.0 \
    SMTPD_AGENT_HTTP_PORT=8001 \
    SMTPD_AGENT_LOG_FORMAT=json
USER smtpd-agent
WORKDIR /var/lib/smtpd-agent
# Port 25 as a non-root user: Docker sets net.ipv4.ip_unprivileged_port_start=0 in the
# container's network namespace (not with --network host; there, map another port).
EXPOSE 25 8001
# /health answers 200 while the process serves (liveness); /health/ready names the
# checks (Postgres, migrations, clamd) for orchestrators that want readiness.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SMTPD_AGENT_HTTP_PORT', '8001'), timeout=4)"]
# SIGTERM drains sessions for up to smtp.shutdown_grace (30 s): give `docker stop` longer
# (docker stop -t 45, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtpd-agent"]
CMD ["serve"]
