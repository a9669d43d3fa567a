"""The driver: runs the QPO loops as persisted, resumable steps (docs/design.md §1)."""
