"""``python -m amptpl``: the same CLI as the ``amptpl`` console script."""

from .cli import app

app(prog_name="amptpl")
