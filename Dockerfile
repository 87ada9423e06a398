# sstate-proxy: the service on its embedded defaults (local disk + SQLite) under /data.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sstate \
    && mkdir -p /data && chown sstate:sstate /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY storage ./storage
RUN pip install --no-cache-dir . && rm -rf /src

USER sstate
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
ENTRYPOINT ["sstate-proxy", "serve"]
CMD ["--bind", "0.0.0.0:8080", "--storage", "/data/sstate-cache", "--database", "sqlite:////data/sstate-proxy.db"]
