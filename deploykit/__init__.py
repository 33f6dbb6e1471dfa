"""k3s-deploy-action: deploy Kubernetes manifests to a private K3s master through S3 and SSM."""

__version__ = "0.1.0"
