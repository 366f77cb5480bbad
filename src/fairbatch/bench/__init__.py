"""HTTP benchmark client: replays a trace against any OpenAI-compatible server and
reports with the same metrics module as the simulator (``fairbatch bench``)."""
