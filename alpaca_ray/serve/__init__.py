"""The serve stage: a Ray Serve app with an OpenAI-compatible API, a web demo with reporting, a content
filter and an output watermark. ``alpaca_ray.serve.app.deploy(ServeConfig(...))`` is the Python API;
``alpaca-ray serve`` the command. Nothing heavy is imported here, so ``--help`` stays fast."""
