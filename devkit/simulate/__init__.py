"""The simulated AWS account and K3s master used by the demo and the end-to-end tests."""

from devkit.simulate.aws import Master, SimulatedAWS, SimulationError, find_aws_cli

__all__ = ["Master", "SimulatedAWS", "SimulationError", "find_aws_cli"]
