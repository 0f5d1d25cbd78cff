"""Ray Serve deployment of MTN translators + a diffusers pipeline (see serve/app.py; `python -m serve`)."""
