"""One router per resource, in the order the OpenAPI schema lists them; ``KEYED`` are behind the API key."""

from fastapi import APIRouter

from app.api.routes import embed, gallery, identities, mask, ops, people, query, sightings

KEYED: list[APIRouter] = [
    gallery.router,
    sightings.router,
    people.router,
    identities.router,
    query.router,
    embed.router,
    mask.router,
    ops.router,
]
OPEN: list[APIRouter] = [ops.health_router]

__all__ = ["KEYED", "OPEN"]
