"""serve-mllm: an OpenAI-compatible HTTP server over one loaded bundle (FastAPI + uvicorn, no PyTorch).

cli.py parses the options and starts the server; app.py holds the routes; protocol.py the request models and
the OpenAI error shape; images.py turns an ``image_url`` into a decoded image within the limits; engine.py runs
the one model instance behind a FIFO queue; metrics.py the Prometheus counters; server.py the uvicorn glue
(signals, graceful shutdown).
"""
