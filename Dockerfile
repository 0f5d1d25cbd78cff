# Images of the MTN platform (NOT BUILT HERE: this machine has no Docker engine; written for a CI with one).
#
#   docker build -t ghcr.io/mtn-platform/mtn-serve:0.1.0 .                          # Ray serving + training (default)
#   docker build --target mlflow -t ghcr.io/mtn-platform/mlflow:3.17.2 .            # tracking server, k8s/mlflow.yaml
#
# The default image is what helm/mtn-serve and the k8s/ RayJobs run: Ray 2.60 with the repository at /app (the
# WORKDIR, so `python jobs/train_mtn.py ...` and `serve.app:build_app` resolve), as the non-root user 1000 `ray`
# with HOME /home/ray like the rayproject/ray images. The pods run with a read-only root filesystem and emptyDirs on
# /tmp, /tmp/ray, /home/ray/.cache and /home/ray/.ray, so nothing here may need writing at run time.

FROM python:3.11-slim AS mlflow
# the stock ghcr.io/mlflow/mlflow image has no Postgres driver and no boto3 for S3 artifacts
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt mlflow==3.17.2 boto3 psycopg2-binary==2.9.13 \
    && rm /tmp/constraints.txt \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/mlflow mlflow
USER 1000
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]

FROM python:3.11-slim AS runtime
# KubeRay runs `ray start` through bash and probes the Ray containers with wget
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/ray --shell /bin/bash ray
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app HOME=/home/ray
WORKDIR /app
# torch first, from its own pin (the Linux wheel from PyPI is the CUDA build the A100 workers need), then the
# project under the full lock; layers are ordered so code changes do not reinstall dependencies
RUN pip install torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY mtn/ mtn/
# (DeepSpeed builds its ops just in time into ~/.cache/torch_extensions, the cache emptyDir; that needs a compiler,
# and nvcc for the fused GPU ops: base on nvidia/cuda:*-devel instead of python:3.11-slim if a job needs them)
RUN pip install -c constraints.txt . && rm -rf /app/build
COPY jobs/ jobs/
COPY serve/ serve/
USER 1000
EXPOSE 8000 8265 6379 10001
CMD ["python", "-c", "print('run through KubeRay (helm/mtn-serve, k8s/); see README.md')"]
