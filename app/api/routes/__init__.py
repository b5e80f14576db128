"""One router per resource; ``ROUTERS`` in the order the OpenAPI schema lists them."""

from app.api.routes import embed, gallery, identities, mask, ops, query

ROUTERS = [gallery.router, identities.router, query.router, embed.router, mask.router, ops.router]

__all__ = ["ROUTERS"]
