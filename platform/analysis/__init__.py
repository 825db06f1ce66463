"""Routing analysis: capture from the one forward (``capture``), metrics over it (``metrics``), the domains it
routes (``domains``), an analysis end to end (``experts``, ``run``) and its figures and HTML report."""
