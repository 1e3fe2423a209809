"""Text-generation models: copies of an LLM engine (vLLM) that neuronserve prepares, plans on
cores, launches, supervises and balances, the way it serves encoders with its own servers.

- :mod:`~neuronserve.generate.artifacts`: prepare a model (a bundled GGUF converted to a plain
  Hugging Face directory, or a local one) and record it in ``generation.json``;
- :mod:`~neuronserve.generate.engine`: the engine's environment and each copy's command;
- :mod:`~neuronserve.generate.plan`: copies x tensor parallelism on the host's cores, and memory;
- :mod:`~neuronserve.generate.launch`: the local launcher (supervisord + nginx for streams).
"""
