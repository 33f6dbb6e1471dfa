#!/usr/bin/env python3
"""Container entry point of the action: all the work lives in deploykit."""

from deploykit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
