"""The development rig of k3s-deploy-action: the simulated AWS account and K3s master, the demo
and the benchmark; and the release workflow's helpers (release.py).

Never part of the product: the image and the wheel hold `deploykit` alone. Run from a clone's
root (`python -m devkit ...`); the tests find it through pytest's `pythonpath` option.
"""
