"""The AMP debugger: what a copy of the core may leave out (``amptpl add --minimal``); the kernel never needs it.

- ``audit``: what precision each tensor really has, after the first step (a feature of the session);
- ``meters``: headroom, underflow and lost updates at log ticks (a feature of the session);
- ``locate``: which module overflowed first, on a replayed step;
- ``numerics``: each module's error against a float32 shadow, and the ``fp32_modules`` that bring it down;
- ``autopick``: ``precision=auto`` by measurement on your model, with a cache.
"""
