"""The protocols a server speaks, one module each: ``native`` (``/predict``, ``/tokenize``, the
probes), ``openai`` (embeddings, models), ``rerank`` (TEI's and Cohere's shapes), ``kserve``
(the Open Inference Protocol, v2). Each decodes its bodies into one
:class:`~neuronserve.serving.work.InferRequest` for the engine and encodes the engine's
:class:`~neuronserve.serving.work.InferResult`; nothing goes back. ``common`` holds what they
share; :mod:`neuronserve.serving.routes` says which path runs which handler.
"""
