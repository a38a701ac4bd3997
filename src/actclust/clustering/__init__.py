"""Clustering methods behind one interface and a registry: k-means, distill and IDEC."""

from .base import CLUSTERINGS, Clustering, KMeans, make_clustering, register
from . import idec, distill  # noqa: F401,E402  (they register "distill" and "idec"; torch only when trained)

__all__ = ["Clustering", "KMeans", "make_clustering", "register", "CLUSTERINGS"]
