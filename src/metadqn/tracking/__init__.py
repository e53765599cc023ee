"""MLflow tracking (runs, metrics, datasets); later the model registry and promotion."""
