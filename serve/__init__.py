"""Ray Serve deployment of MTN translators + a diffusers pipeline (see serve/app.py; `python -m serve`)."""

# the service's logger, a child of Ray Serve's: in a replica Serve's logging_config (JSON) and request ids apply
LOGGER = "ray.serve.mtn"
