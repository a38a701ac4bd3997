"""A user study of the explanations: do they raise *warranted* trust in the model?

``actclust study create`` pre-renders a study folder from a saved run (:mod:`.create`, the only
module here that needs torch), ``actclust study serve`` runs it as a web app storing responses
in SQLite (:mod:`.app`, :mod:`.db`), and ``actclust study analyze`` computes reliance metrics with
participant-resampling bootstrap intervals (:mod:`.analyze`). Serving and analysing read only
the study folder: neither imports torch nor the model.

The folder holds ``study.json`` (schema :data:`.folder.SCHEMA`) and, once served,
``responses.sqlite``.
"""

from .folder import CONDITIONS, SCHEMA, Study, load_study

__all__ = ["CONDITIONS", "SCHEMA", "Study", "load_study", "create_study", "analyze_study"]


def create_study(*args, **kwargs):
    """Build a study folder from a fitted explainer; see :func:`actclust.study.create.create_study`."""
    from .create import create_study as _create  # imports torch: only when a study is created

    return _create(*args, **kwargs)


def analyze_study(*args, **kwargs):
    """Reliance metrics of a study's responses; see :func:`actclust.study.analyze.analyze_study`."""
    from .analyze import analyze_study as _analyze

    return _analyze(*args, **kwargs)
