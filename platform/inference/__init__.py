"""Inference for serving: the block latent cache, flat (continuous) batches, sampling, and the engine.

``cache``: blocks of the absorbed-MLA latent cache and their allocator. ``batch``: one engine
step's tokens, from many sequences at once, as flat tensors. ``forward``: the model's layers over
such a step (shared by the single process and the actor graph's stages). ``sampling``: request
parameters and token choice. ``engine``: the continuous-batching scheduler with MTP speculative
decoding. No Ray here; ``raymoe.actors.inference`` drives the same steps on the actor graph.
"""
