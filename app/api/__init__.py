"""The HTTP layer: routes per resource (``routes/``), their dependencies (``deps``) and the middlewares."""
