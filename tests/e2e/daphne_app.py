"""The end-to-end test app (``tests.e2e.apps.make_app``) as daphne runs it.

daphne sends no lifespan events: the app is wrapped in the README's
``LifespanOnFirstRequest`` (the ``no-lifespan`` block, executed from the README
itself, so what is tested is what users copy). Run as
``daphne tests.e2e.daphne_app:app``.
"""

from __future__ import annotations

from tests.e2e.apps import make_app
from tests.test_readme import load

app = load("no-lifespan").LifespanOnFirstRequest(make_app())
