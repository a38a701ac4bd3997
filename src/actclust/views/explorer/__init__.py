"""``actclust view``: a local, read-only web app to explore a run (:mod:`.data`: what pages show;
:mod:`.app`: the pages; :mod:`.cli`: the command)."""

from .data import Explorer, NotFound

__all__ = ["Explorer", "NotFound", "make_app"]


def make_app(explorer, token: str, **options):
    """The explorer's FastAPI app (:func:`actclust.views.explorer.app.make_app`)."""
    from .app import make_app as _make_app

    return _make_app(explorer, token, **options)
