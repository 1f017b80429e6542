"""The AMP debugger, one module per tool; the kernel never needs it (``amptpl add --minimal`` leaves it out)."""
