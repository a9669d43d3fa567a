"""Stage 1 — data: the row schema, the versioned dataset store, Ray Data reading, importers."""
