#!/opt/venv/bin/python
"""Post-entrypoint of the container action (action.yml `runs.post-entrypoint`): deletes what
the main step staged and could not delete. All the work lives in deploykit.post."""

from deploykit.post import main

if __name__ == "__main__":
    raise SystemExit(main())
