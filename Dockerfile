# The kuberun gateway image: docker build -t kuberun:0.1.0 .  (deploy/ runs it; .dockerignore
# keeps the context to what the wheel is built from). Runs as uid 10001, read-only root
# filesystem friendly. The real-cluster tests build the same thing without a container
# builder: tests/realcluster/gateway_image.py.
FROM python:3.12-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-deps -w /wheels . && pip wheel -w /wheels /wheels/kuberun-*.whl

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index -f /wheels kuberun && rm -rf /wheels \
    && useradd --uid 10001 --create-home kuberun
USER 10001
ENV KUBERUN_REQUIRE_EXTENSIONS=1
EXPOSE 2222 9100
ENTRYPOINT ["kuberun"]
CMD ["serve", "--config", "/etc/kuberun/config.yaml"]
