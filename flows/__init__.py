"""The lord-pipeline flow: Prefect tasks over the library stage functions, MLflow tracking, deployments, CLI.

The only package that imports prefect and mlflow. Import the flow from ``flows.pipeline``; this module stays
light so ``lord --help`` does not pay for Prefect's import.
"""

from flows.errors import FlowError

__all__ = ["FlowError"]
