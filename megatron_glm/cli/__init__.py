"""Console entry points (``glm-*``)."""
