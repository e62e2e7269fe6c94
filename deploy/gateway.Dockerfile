# The wanwu gateway in a container that drives the host's Docker engine (see
# docker-compose.yml). Built by `wanwu image build --target gateway`, which fills
# deploy/wheelhouse with the project's wheel and its dependencies on the host.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
COPY wheelhouse/ /build/wheels/
RUN python3 -m venv --without-pip /opt/wanwu \
 && pip_wheel=$(ls /build/wheels/pip-*.whl) \
 && /opt/wanwu/bin/python "$pip_wheel/pip" install --quiet --no-index --no-cache-dir \
      --find-links /build/wheels wanwu

FROM ${BASE_IMAGE}
COPY --from=build /opt/wanwu /opt/wanwu
ENV PATH=/opt/wanwu/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    WANWU_SOCKET_DIR=/run/wanwu \
    WANWU_MODELS_DIR=/var/lib/wanwu/models
LABEL org.opencontainers.image.title="wanwu-gateway"
EXPOSE 8080
ENTRYPOINT ["wanwu"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
