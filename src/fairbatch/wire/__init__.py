"""What travels over HTTP in OpenAI's format, for every side of it: the server answers
with it, the router reads and forwards it, the benchmark client reads it.

- ``errors.py``: error bodies (``{"error": {...}}``), reading their message back;
- ``sse.py``: server-sent events: writing one, splitting a stream into events or lines.

Imports nothing of fairbatch, and no web framework.
"""
