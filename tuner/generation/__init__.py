"""Generation, below the engine: the batched generator (generate.py) and the inference-time model loader
(load.py), used by the evaluate hook, chat, serve, web, MMBench and the identity recipe."""
