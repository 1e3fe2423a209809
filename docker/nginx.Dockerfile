# nginx in front of a deploy.launcher=docker deployment, for hosts that cannot pull nginx:1.27-alpine
# (deploy.docker_nginx_image=neuronserve-nginx:latest). deploy writes /etc/nginx/nginx.conf into
# the container before it starts. BASE_IMAGE: as docker/serve-cpu.Dockerfile (any Debian image).
ARG BASE_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7: the tag is pinned in BASE_IMAGE above
FROM ${BASE_IMAGE}
# The base image's Debian release fixes nginx's version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && useradd --no-create-home --uid 10001 neuronserve \
 && chown -R 10001:10001 /var/lib/nginx /var/log/nginx
# Not root: the written config listens on 8080, keeps its pid in /tmp and logs to stdout/stderr.
USER 10001
EXPOSE 8080
# As nginx:1.27-alpine: no probe of its own (deploy waits for the servers' /ready through it).
HEALTHCHECK NONE
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
