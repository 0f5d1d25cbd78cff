# Images of the MTN platform, built where a Docker engine runs (your machine or CI) through the Makefile:
#
#   IMAGE=<registry>/mtn-serve:0.1.0 make image                # Ray serving + training (default target `runtime`)
#   MLFLOW_IMAGE=<registry>/mtn-mlflow:3.17.2 make image-mlflow # tracking server (target `mlflow`), k8s/mlflow.yaml
#   make push / make push-mlflow                                # then push them (after `docker login <registry>`)
#
# Without IMAGE the tags are mtn-serve:<version of pyproject.toml> and mtn-mlflow:<mlflow pin>: the names the chart
# (image.repository/tag) and k8s/*.yaml use by default, so they run as is on a cluster that can see your local images
# (kind load, minikube); anywhere else set the chart's image.repository and the manifests' image: to what you pushed.
#
# The default image is what helm/mtn-serve and the k8s/ RayJobs run: Ray 2.60 with the repository at /app (the
# WORKDIR, so `python jobs/train_mtn.py ...` and `serve.app:build_app` resolve), as the non-root user 1000 `ray`
# with HOME /home/ray like the rayproject/ray images. The pods run with a read-only root filesystem and emptyDirs on
# /tmp, /tmp/ray, /home/ray/.cache and /home/ray/.ray, so nothing here may need writing at run time.
#
# Base images: the tag names the Python minor AND the Debian release (trixie), so Python 3.11 and the Debian package
# versions below stay in one release line. For byte-exact rebuilds pin the digest your build resolved, e.g.
# `FROM python:3.11-slim-trixie@sha256:<digest from: docker buildx imagetools inspect python:3.11-slim-trixie>`.
# `make lint` runs hadolint on this file (the CI runs it too).

FROM python:3.11-slim-trixie AS mlflow
# the stock ghcr.io/mlflow/mlflow image has no Postgres driver and no boto3 for S3 artifacts
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt mlflow==3.17.2 boto3 psycopg2-binary==2.9.13 \
    && rm /tmp/constraints.txt \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/mlflow mlflow
USER 1000
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]

FROM python:3.11-slim-trixie AS runtime
# KubeRay runs `ray start` through bash and probes the Ray containers with wget.
# DeepSpeed compiles its CPU ops (cpu_adam for ZeRO offload, shm_comm) just in time, on first use, into
# ~/.cache/torch_extensions (the cache emptyDir): that needs g++ (here), ninja (pip, a DeepSpeed dependency, pinned
# in constraints.txt) and the Python headers (in /usr/local/include/python3.11 of the official python images).
# Compiling at run time rather than prebuilding (DS_BUILD_CPU_ADAM=1 ... at pip install) because DeepSpeed builds
# these ops with -march=native: ops prebuilt here would carry the build machine's CPU instructions and can crash
# (illegal instruction) on a node with another CPU; the JIT build fits each node, costs ~1 min once per pod, and
# needs no GPU or CUDA toolchain at `docker build`. The fused GPU ops need nvcc as well: base on
# nvidia/cuda:*-devel instead of python:3.11-slim-trixie if a job needs them.
# DL3008 (apt versions unpinned): Debian drops a package's previous version from its archive with every point or
# security release, so `pkg=<version>` pins break this build within weeks; the base tag fixes the Debian release
# (trixie) and with it each package's upstream version, and a pushed image (by tag or digest) is what stays fixed.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/ray --shell /bin/bash ray
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app HOME=/home/ray
WORKDIR /app
# torch first, from its own pin (the Linux wheel from PyPI is the CUDA build the A100 workers need), then the
# project under the full lock; layers are ordered so code changes do not reinstall dependencies
RUN pip install torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY mtn/ mtn/
# ninja is named although DeepSpeed pulls it in: the JIT op build above depends on it
RUN pip install -c constraints.txt . ninja && rm -rf /app/build
COPY jobs/ jobs/
COPY serve/ serve/
USER 1000
EXPOSE 8000 8265 6379 10001
CMD ["python", "-c", "print('run through KubeRay (helm/mtn-serve, k8s/); see README.md')"]
