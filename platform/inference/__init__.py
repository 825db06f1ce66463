"""Inference for serving: the block latent cache, flat (continuous) batches, sampling, and the engine.

``cache``: blocks of the absorbed-MLA latent cache and their allocator. ``batch``: one engine
step's tokens, from many sequences at once, as flat tensors and their attention context.
``runner``: the model's one forward over such a step in this process (``compiled``: the same,
``torch.compile``'d). ``sampling``: request parameters and token choice. ``engine``: the
continuous-batching scheduler with MTP speculative decoding. No Ray here; ``raymoe.actors.graph``
runs the same steps on the actor graph.
"""
