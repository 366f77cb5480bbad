"""Integrations of fairbatch's scheduling policies into other serving systems.

``fairbatch.integrations.vllm``: FairBatching (and Sarathi, vLLM-order, prefill-first)
as a vLLM V1 ``--scheduler-cls`` plugin. Importing it needs vLLM; the helpers it uses
(``vllm_config``: SLO/config loading, ``fairbatch.latency.online``: the refitting step-time model,
``load_server``: the load endpoint for routers) do not, so they are tested without it.
"""
